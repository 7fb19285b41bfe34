"""Stacked SwiGLU experts: parameters [E, D, F] and two ways to apply them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

import pallas_kernels
from moejax.layers import dot, fan_in_init

ExpertWeights = dict[str, jax.Array]  # w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]


class Experts(nn.Module):
  """Holds the E experts' SwiGLU weights; dispatchers decide how to apply them."""

  num_experts: int
  hidden: int
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, d: int) -> ExpertWeights:
    e, f = self.num_experts, self.hidden
    init_in = fan_in_init(d)
    return {
        "w_gate": self.param("w_gate", init_in, (e, d, f)),
        "w_up": self.param("w_up", init_in, (e, d, f)),
        "w_down": self.param("w_down", fan_in_init(f, self.out_scale), (e, f, d)),
    }


def swiglu_batched(w: ExpertWeights, x_ExCxD: jax.Array, dtype) -> jax.Array:
  """Expert e applied to its own buffer x[e]: [E, C, D] -> [E, C, D] float32."""
  g = dot("ecd,edf->ecf", x_ExCxD, w["w_gate"], dtype)
  u = dot("ecd,edf->ecf", x_ExCxD, w["w_up"], dtype)
  return dot("ecf,efd->ecd", nn.silu(g) * u, w["w_down"], dtype)


def swiglu_grouped(w: ExpertWeights, x_AxD: jax.Array, group_sizes_E: jax.Array,
                   dtype, *, backend: str = "auto", group_offset: Any = None,
                   scale_A: jax.Array | None = None) -> jax.Array:
  """Experts on rows sorted by expert (ragged groups): [A, D] -> [A, D] float32.

  `pallas_kernels.grouped_swiglu` with products in `dtype`: rows past
  sum(group_sizes) (and, with `group_offset`, rows of experts this `w`
  does not hold) come out zero. `scale_A` [A] (optional) multiplies each
  row's result (the combine weights).
  """
  return pallas_kernels.grouped_swiglu(
      x_AxD, w["w_gate"], w["w_up"], w["w_down"], group_sizes_E, scale=scale_A,
      compute_dtype=dtype, group_offset=group_offset, backend=backend)
