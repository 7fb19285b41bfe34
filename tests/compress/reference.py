"""Slow NumPy float64 references for the compression tests (nothing of moejax.compress)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax import model as lm

MOE = ("moe_layers", "block0", "moe")


def moe_inputs(cfg, variables, ids) -> np.ndarray:
  """[N, B, L, D] float64: the ffn_norm output of every MoE block (flax capture_intermediates),
  i.e. what enters each MoE layer, taken without the layer's own sow."""
  model = lm.make_model(cfg)
  _, inter = jax.jit(lambda v, i: model.apply(
      v, i, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "ffn_norm"))(variables, jnp.asarray(ids))
  return np.asarray(inter["intermediates"]["moe_layers"]["block0"]["ffn_norm"]["__call__"][0],
                    np.float64)


def moe_params(variables) -> dict:
  """The stacked MoE-layer params as float64 NumPy arrays."""
  node = variables["params"]
  for k in MOE:
    node = node[k]
  return {part: {k: np.asarray(v, np.float64) for k, v in leaves.items()}
          for part, leaves in node.items()}


def softmax(x: np.ndarray) -> np.ndarray:
  p = np.exp(x - x.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def topk_combine(logits_TxE: np.ndarray, k: int, renormalize: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(combine [T, E], probs [T, E]) of softmax-then-top-k routing (ties: lower index)."""
  p = softmax(logits_TxE)
  top = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  sel = np.zeros(p.shape, bool)
  np.put_along_axis(sel, top, True, axis=-1)
  w = np.where(sel, p, 0.0)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  return w, p


def silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def topk_swiglu_layer(x_TxD: np.ndarray, w_gate_DxE: np.ndarray, experts: dict, k: int,
                      keep: list[int] | None = None) -> np.ndarray:
  """The output of a top-k (softmax, renormalised) MoE layer of SwiGLU experts, keeping only
  the experts `keep` (default all): routing over the kept experts alone."""
  e = w_gate_DxE.shape[1]
  keep = list(range(e)) if keep is None else list(keep)
  comb, _ = topk_combine(x_TxD @ w_gate_DxE[:, keep], k)
  y = np.zeros_like(x_TxD)
  for j, ex in enumerate(keep):
    h = silu(x_TxD @ experts["w_gate"][ex]) * (x_TxD @ experts["w_up"][ex])
    y += comb[:, j:j + 1] * (h @ experts["w_down"][ex])
  return y
