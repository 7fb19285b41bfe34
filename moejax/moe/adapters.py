"""Adapter experts: routed LoRA experts on a frozen base model (`moe.adapters`).

Each adapted layer gets `n_l` LoRA experts of rank r in parallel with its FFN
sublayer (and, with `targets` containing "attn", with its attention
sublayer): for the sublayer input z (the normed residual stream),

  out = sublayer(z) + (alpha / r) * sum_e c[t, e] * (z A_e) B_e,

A_e [D, r], B_e [r, D] (B starts at zero, so the adapted model starts equal to
the base), c the top-k combine weights of a linear router over the layer's
experts. The adapter is a low-rank map next to the whole sublayer, so it works
the same on dense and MoE layers and leaves the base modules untouched.

Per-layer expert counts (the allocation: uniform, increasing or decreasing
with depth, or a custom list) cannot differ inside the model's scanned layer
stacks, so every layer holds max_l n_l experts and a non-trained
"adapter_mask" collection marks the first n_l of layer l valid: invalid
experts get router logit -1e9 (probability exactly 0), are never chosen, and
get no gradient. Layers that are not adapted have n_l = 0 and add nothing.
The balancing loss is the switch loss over a layer's valid experts (1 at
perfect balance); the z-loss is ST-MoE's over the valid logits (both from
moejax/moe/losses.py). The module returns them unweighted with its output;
they travel with every other auxiliary loss (declared in `aux_losses`,
weighted by `moe.adapters.aux_loss_weight` / `z_loss_weight`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.aux_losses import AuxLoss
from moejax.checks import ConfigError, positive, refuse_constant_gate
from moejax.layers import fan_in_init
from moejax.moe.losses import router_z_loss, switch_load_balance
from moejax.moe.routers.topk import topk_route

ALLOCATIONS = ("uniform", "increasing", "decreasing", "custom")
TARGETS = ("ffn", "attn")
MASK_COLLECTION = "adapter_mask"
MODULE_NAMES = {"ffn": "ffn_adapter", "attn": "attn_adapter"}
MASKED_LOGIT = -1e9


def adapters_cfg(cfg: ml_collections.ConfigDict) -> Any:
  """The `moe.adapters` group if adapters are enabled, else None (old configs lack it)."""
  a = cfg.moe.get("adapters") if hasattr(cfg.moe, "get") else None
  return a if a is not None and a.enabled else None


def parse_targets(targets: str) -> tuple[str, ...]:
  out = tuple(t.strip() for t in targets.split(",") if t.strip())
  bad = [t for t in out if t not in TARGETS]
  if bad or not out or len(set(out)) != len(out):
    raise ValueError(f"config key moe.adapters.targets={targets!r} is invalid: "
                     f"comma-separated, each once, from {list(TARGETS)}")
  return out


def adapted_layers(a, num_layers: int) -> list[int]:
  """Model layer indices that get adapters (`moe.adapters.layers`: "all" or "0,2,3")."""
  if a.layers.strip() == "all":
    return list(range(num_layers))
  try:
    out = [int(s) for s in a.layers.split(",") if s.strip()]
  except ValueError:
    out = []
  if not out or sorted(set(out)) != out or out[0] < 0 or out[-1] >= num_layers:
    raise ValueError(f"config key moe.adapters.layers={a.layers!r} is invalid: 'all' or "
                     f"increasing comma-separated layer indices in [0, {num_layers})")
  return out


def _proportional(weights: list[float], total: int) -> list[int]:
  """Integers proportional to `weights` summing to `total` (largest remainder)."""
  raw = [total * w / sum(weights) for w in weights]
  out = [math.floor(r) for r in raw]
  order = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
  for i in order[:total - sum(out)]:
    out[i] += 1
  return out


def allocate_experts(a, num_layers: int) -> list[int]:
  """LoRA experts per adapted layer (in layer order), from `moe.adapters`.

  uniform: num_experts each; increasing / decreasing: proportional to the
  position 1..n among the n adapted layers (or n..1), summing to
  num_experts * n, so the total equals the uniform one; custom: the
  comma-separated `experts_per_layer`, one entry per adapted layer.
  """
  layers = adapted_layers(a, num_layers)
  n = len(layers)
  if a.allocation not in ALLOCATIONS:
    raise ValueError(f"config key moe.adapters.allocation={a.allocation!r} is invalid: "
                     f"allowed: {list(ALLOCATIONS)}")
  if a.allocation == "custom":
    try:
      counts = [int(s) for s in a.experts_per_layer.split(",") if s.strip()]
    except ValueError:
      counts = []
    if len(counts) != n:
      raise ValueError(
          f"config key moe.adapters.experts_per_layer={a.experts_per_layer!r} is invalid: "
          f"it has {len(counts)} entries but moe.adapters.layers={a.layers!r} adapts {n} "
          f"layers {layers}; give one integer per adapted layer, comma-separated")
  elif a.allocation == "uniform":
    counts = [a.num_experts] * n
  else:
    ramp = list(range(1, n + 1))
    counts = _proportional(ramp if a.allocation == "increasing" else ramp[::-1],
                           a.num_experts * n)
  low = min(counts)
  if low < max(a.top_k, 1):
    raise ValueError(
        f"config key moe.adapters.allocation={a.allocation!r} gives {counts} LoRA experts "
        f"for layers {layers}; every adapted layer needs at least moe.adapters.top_k="
        f"{a.top_k} experts (raise moe.adapters.num_experts or change the allocation)")
  return counts


def layer_counts(cfg: ml_collections.ConfigDict) -> list[int]:
  """LoRA experts for every model layer (0 for layers without adapters)."""
  a = adapters_cfg(cfg)
  n = cfg.model.num_layers
  if a is None:
    return [0] * n
  out = [0] * n
  for layer, count in zip(adapted_layers(a, n), allocate_experts(a, n)):
    out[layer] = count
  return out


def expert_param_count(d_model: int, rank: int) -> int:
  """Parameters of one LoRA expert (A and B) plus its router column."""
  return 2 * d_model * rank + d_model


def trainable_param_count(cfg: ml_collections.ConfigDict) -> int:
  """Adapter + router parameters that are used (padding experts excluded)."""
  a = adapters_cfg(cfg)
  if a is None:
    return 0
  per_layer = sum(layer_counts(cfg)) * expert_param_count(cfg.model.d_model, a.rank)
  return per_layer * len(parse_targets(a.targets))


def adapter_route(logits_TxE: jax.Array, valid_E: jax.Array, k: int,
                  renormalize: bool = True):
  """Top-k (softmax, then top-k, renormalised or not) over the valid experts.

  Returns (combine [T, E], counts [E], probs [T, E], masked logits [T, E]).
  Invalid experts get zero probability, combine weight and count; a layer
  with no valid expert gets zero combine weights and counts everywhere.
  """
  logits_TxE = jnp.where(valid_E[None, :], logits_TxE.astype(jnp.float32), MASKED_LOGIT)
  assignment, probs_TxE = topk_route(logits_TxE, k, "softmax_topk", renormalize=renormalize)
  t, e = logits_TxE.shape
  valid_f = valid_E.astype(jnp.float32)
  combine_TxE = assignment.combine_matrix(t, e) * valid_f[None, :]
  counts_E = assignment.expert_counts(e) * valid_f
  return combine_TxE, counts_E, probs_TxE, logits_TxE


def balance_losses(counts_E: jax.Array, probs_TxE: jax.Array, logits_TxE: jax.Array,
                   valid_E: jax.Array) -> dict[str, jax.Array]:
  """(switch balance over the n valid experts, z-loss); zeros for a layer with none."""
  n = jnp.sum(valid_E.astype(jnp.float32))
  live = (n > 0).astype(jnp.float32)
  return {"adapter_balance": live * switch_load_balance(probs_TxE, counts_E, n),
          "adapter_z_loss": live * router_z_loss(logits_TxE)}


def aux_losses(cfg: ml_collections.ConfigDict) -> tuple[AuxLoss, ...]:
  """The adapter experts' losses (reported by every layer; 0 where not adapted)."""
  if adapters_cfg(cfg) is None:
    return ()
  return (AuxLoss("adapter_balance", "moe.adapters.aux_loss_weight", per_moe_layer=False),
          AuxLoss("adapter_z_loss", "moe.adapters.z_loss_weight", per_moe_layer=False))


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """moe.adapters.* values (the base run itself is checked by moejax/init/checks.py)."""
  a = cfg.moe.get("adapters")
  if a is None or not a.enabled:
    return
  for key in ("moe.adapters.rank", "moe.adapters.top_k", "moe.adapters.num_experts",
              "moe.adapters.alpha"):
    positive(cfg, key)
  for key in ("moe.adapters.aux_loss_weight", "moe.adapters.z_loss_weight"):
    positive(cfg, key, allow_zero=True)
  try:
    parse_targets(a.targets)
    per_layer = allocate_experts(a, cfg.model.num_layers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  refuse_constant_gate("moe.adapters.top_k", a.top_k, "moe.adapters.renormalize",
                       a.get("renormalize", True), max(per_layer))


class AdapterExperts(nn.Module):
  """`num_experts` (padded) LoRA experts + router on [B, L, D].

  Returns (delta [B, L, D] float32, unweighted losses `balance_losses`).
  """

  num_experts: int
  rank: int
  top_k: int
  alpha: float
  renormalize: bool = True

  @nn.compact
  def __call__(self, z_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, l, d = z_BxLxD.shape
    e, r = self.num_experts, self.rank
    valid_E = self.variable(MASK_COLLECTION, "valid", lambda: jnp.ones((e,), bool)).value
    w_DxE = self.param("router", fan_in_init(d), (d, e))
    a_ExDxR = self.param("lora_a", fan_in_init(d), (e, d, r))
    b_ExRxD = self.param("lora_b", nn.initializers.zeros, (e, r, d))
    z_TxD = z_BxLxD.reshape(b * l, d).astype(jnp.float32)
    logits_TxE = jnp.dot(z_TxD, w_DxE, precision="highest")
    combine_TxE, counts_E, probs_TxE, logits_TxE = adapter_route(
        logits_TxE, valid_E, min(self.top_k, e), self.renormalize)
    h_TxExR = jnp.einsum("td,edr->ter", z_TxD, a_ExDxR)
    y_TxD = jnp.einsum("ter,erd->td", h_TxExR * combine_TxE[:, :, None], b_ExRxD)
    y_TxD = y_TxD * (self.alpha / r)
    losses = balance_losses(counts_E, probs_TxE, logits_TxE, valid_E)
    return y_TxD.reshape(b, l, d), losses


def make_adapter(cfg: ml_collections.FrozenConfigDict, target: str) -> AdapterExperts | None:
  """The adapter module a Block puts next to `target` ("ffn"/"attn"), or None."""
  a = adapters_cfg(cfg)
  if a is None or target not in parse_targets(a.targets):
    return None
  return AdapterExperts(max(layer_counts(cfg)), a.rank, a.top_k, a.alpha,
                        a.get("renormalize", True), name=MODULE_NAMES[target])


# --- what the trainer needs: trainable-parameter selection, masks, losses ----


def is_trainable_path(path: tuple) -> bool:
  """True for parameters inside an adapter module (LoRA experts and their routers)."""
  names = {getattr(p, "key", getattr(p, "name", None)) for p in path}
  return bool(names & set(MODULE_NAMES.values()))


def trainable_labels(params: Any) -> Any:
  """"adapter" / "frozen" for every leaf (optax.multi_transform labels)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "adapter" if is_trainable_path(p) else "frozen", params)


def freeze_base(params: Any) -> Any:
  """stop_gradient on every non-adapter leaf (no base gradients are computed)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x if is_trainable_path(p) else jax.lax.stop_gradient(x), params)


def split_trainable(params: dict) -> dict:
  """The nested dict of adapter leaves only (what adapter checkpoints store)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      if k in MODULE_NAMES.values():
        out[k] = v
      else:
        sub = split_trainable(v)
        if sub:
          out[k] = sub
  return out


def merge_trainable(params: dict, trainable: dict) -> dict:
  """`params` with the adapter leaves replaced by those in `trainable`."""
  out = dict(params)
  for k, v in trainable.items():
    out[k] = v if k in MODULE_NAMES.values() else merge_trainable(params[k], v)
  return out


def count_leaves(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))

