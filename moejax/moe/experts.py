"""Stacked SwiGLU experts: parameters [E, D, F] and two ways to apply them."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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
                   dtype, gmm: Callable, scale_A: jax.Array | None = None
                   ) -> jax.Array:
  """Experts on rows sorted by expert (ragged groups): [A, D] -> [A, D] float32.

  `gmm(lhs, rhs, group_sizes, preferred_element_type=...)` has the
  `pallas_kernels.gmm` signature; rows past sum(group_sizes) come out zero.
  `scale_A` [A] (optional) multiplies each row's result (the combine
  weights). The down projection is linear, so it is applied on the narrower
  side: the [A, F] hidden rows inside the SwiGLU elementwise pass when
  F <= D (which also spares the backward an [A, D] product and reduction),
  else the [A, D] outputs.
  """
  f32 = jnp.float32
  x = x_AxD.astype(dtype)
  g = gmm(x, w["w_gate"].astype(dtype), group_sizes_E, preferred_element_type=f32)
  u = gmm(x, w["w_up"].astype(dtype), group_sizes_E, preferred_element_type=f32)
  on_hidden = scale_A is not None and g.shape[-1] <= x_AxD.shape[-1]
  h = nn.silu(g) * u
  if on_hidden:
    h = h * scale_A[:, None]
  y = gmm(h.astype(dtype), w["w_down"].astype(dtype), group_sizes_E,
          preferred_element_type=f32)
  if scale_A is not None and not on_hidden:
    y = y * scale_A[:, None]
  return y
