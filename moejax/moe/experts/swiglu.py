"""SwiGLU experts (`moe.expert="swiglu"`, the default): y = (silu(x Wg) * (x Wu)) Wd.

Leaves w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D] (FSDP may shard
F). The ragged path is `pallas_kernels.grouped_swiglu`: one fused chunk loop
forward and one backward on the `cpu` backend, composed from gmm/tgmm (the
Pallas kernels) on TPU and GPU. The combine weights go on the narrower side
(the [A, F] hidden rows when F <= D), which the kernel decides.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

import pallas_kernels
from moejax.layers import dot, swiglu
from moejax.moe.experts.base import ExpertFamily, Leaf, row_norms


@dataclasses.dataclass(frozen=True)
class SwiGLUExperts(ExpertFamily):
  """Gated SiLU experts (Shazeer 2020; Mixtral, DeepSeek, Qwen-MoE, OLMoE)."""

  name = "swiglu"

  def leaves(self) -> dict[str, Leaf]:
    return {"w_gate": Leaf(("E", "D", "F"), fan_in="D", fsdp="F"),
            "w_up": Leaf(("E", "D", "F"), fan_in="D", fsdp="F"),
            "w_down": Leaf(("E", "F", "D"), fan_in="F", output=True, fsdp="F")}

  def batched(self, w: dict, x_ExCxD: jax.Array, dtype) -> jax.Array:
    g = dot("ecd,edf->ecf", x_ExCxD, w["w_gate"], dtype)
    u = dot("ecd,edf->ecf", x_ExCxD, w["w_up"], dtype)
    return dot("ecf,efd->ecd", nn.silu(g) * u, w["w_down"], dtype)

  def grouped(self, w: dict, x_AxD: jax.Array, group_sizes: jax.Array, dtype, *,
              backend: str = "auto", group_offset: Any = None,
              scale_A: jax.Array | None = None) -> jax.Array:
    return pallas_kernels.grouped_swiglu(
        x_AxD, w["w_gate"], w["w_up"], w["w_down"], group_sizes, scale=scale_A,
        compute_dtype=dtype, group_offset=group_offset, backend=backend)

  def activation_norms(self, w: dict, x_NxD: jax.Array, dtype) -> jax.Array:
    """||x W_gate^e||: the gate projection, what the SiLU reads."""
    return row_norms(dot("nd,edf->nef", x_NxD, w["w_gate"], dtype))

  def dense(self, w: dict, x_TxD: jax.Array, dtype) -> jax.Array:
    return swiglu(x_TxD, w["w_gate"], w["w_up"], w["w_down"], dtype)
