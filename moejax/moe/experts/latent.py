"""Mixture of Latent Experts (`moe.expert="latent"`): SwiGLU experts that share a latent space.

Liu et al. (2025), "MoLAE: Mixture of Latent Experts for Parameter-Efficient
Language Models" (arXiv:2503.23100; first version "Beyond Standard MoE:
Mixture of Latent Experts for Resource-Efficient Language Models"). The paper
factors each expert's gate and up projections into a projection into a
low-dimensional latent space, shared by all experts of the layer, followed by
a small expert-specific transformation; the down projection stays
per expert. In this codebase's [in, out] layout, expert e is

  y = (silu(x A_gate B_gate[e]) * (x A_up B_up[e])) W_down[e]

Leaves: a_gate [D, R] and a_up [D, R], shared (no expert axis: one array per
MoE layer); b_gate [E, R, F], b_up [E, R, F] and w_down [E, F, D] per
expert. Expert e's SwiGLU matrices are W_gate[e] = A_gate B_gate[e] and
W_up[e] = A_up B_up[e] ([D, F] each, of rank <= R).

Options (`moe.latent.*`):
  rank: R, the latent width, 1 <= R <= model.d_model (A [D, R] spans at
      most D dimensions, so a larger R adds parameters and no function;
      R = D represents any SwiGLU experts exactly, which the conversion of
      a trained run uses, moejax/compress/latent.py).

Per layer a routed expert has 2 R F + F D parameters, plus 2 D R shared by
all E experts (counted once per layer, moejax/model/counting.py); a SwiGLU
expert has 3 D F. The shared experts of a latent run (`moe.num_shared_experts`)
are one latent expert of their own width with their own a_gate / a_up.

Every path applies the shared projection to the rows it gets (each expert
buffer row, each sorted row of the ragged path), so a token routed to k
experts is projected k times: `flops_per_token` counts those k products. The
ragged path is a dense [A, D] x [D, R] product per projection and three
`pallas_kernels.gmm` calls (their custom VJP gives the gradients); rows
outside this call's experts come out zero like gmm's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from moejax.checks import fail, is_int
from moejax.layers import dot
from moejax.moe.experts.base import ExpertFamily, Leaf, row_norms

RANK = "R"  # the latent dim's name in the leaves' dims


@dataclasses.dataclass(frozen=True)
class LatentExperts(ExpertFamily):
  """SwiGLU experts whose gate / up projections go through a shared latent space (MoLE)."""

  name = "latent"
  rank: int = 64

  @classmethod
  def from_config(cls, cfg_moe) -> "LatentExperts":
    return cls(int(cfg_moe.latent.rank))

  @classmethod
  def check_config(cls, cfg) -> None:
    r, d = cfg.moe.latent.rank, cfg.model.d_model
    if not is_int(r) or not 1 <= r <= d:
      fail("moe.latent.rank", r, f"allowed: an integer in [1, model.d_model={d}] (the shared "
           f"projections A [D, R] span at most D={d} latent dimensions)")

  def leaves(self) -> dict[str, Leaf]:
    fixed = ((RANK, self.rank),)
    return {"a_gate": Leaf(("D", RANK), fan_in="D", fsdp="D", fixed=fixed),
            "a_up": Leaf(("D", RANK), fan_in="D", fsdp="D", fixed=fixed),
            "b_gate": Leaf(("E", RANK, "F"), fan_in=RANK, fsdp="F", fixed=fixed),
            "b_up": Leaf(("E", RANK, "F"), fan_in=RANK, fsdp="F", fixed=fixed),
            "w_down": Leaf(("E", "F", "D"), fan_in="F", output=True, fsdp="F")}

  def batched(self, w: dict, x_ExCxD: jax.Array, dtype) -> jax.Array:
    def proj(a, b):
      z_ExCxR = dot("ecd,dr->ecr", x_ExCxD, w[a], dtype)
      return dot("ecr,erf->ecf", z_ExCxR, w[b], dtype)
    h_ExCxF = nn.silu(proj("a_gate", "b_gate")) * proj("a_up", "b_up")
    return dot("ecf,efd->ecd", h_ExCxF, w["w_down"], dtype)

  def grouped(self, w: dict, x_AxD: jax.Array, group_sizes: jax.Array, dtype, *,
              backend: str = "auto", group_offset: Any = None,
              scale_A: jax.Array | None = None) -> jax.Array:
    def gmm(lhs, rhs):
      return pallas_kernels.gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes,
                                preferred_element_type=jnp.float32, group_offset=group_offset,
                                backend=backend)

    def proj(a, b):
      return gmm(dot("ad,dr->ar", x_AxD, w[a], dtype), w[b])
    # Rows of other groups: gate and up are zero, so silu(0) * 0 and the output are too.
    y_AxD = gmm(nn.silu(proj("a_gate", "b_gate")) * proj("a_up", "b_up"), w["w_down"])
    if scale_A is not None:
      y_AxD = y_AxD * scale_A[:, None].astype(jnp.float32)
    return y_AxD

  def activation_norms(self, w: dict, x_NxD: jax.Array, dtype) -> jax.Array:
    """||x A_gate B_gate^e||: the gate projection, what the SiLU reads."""
    z_NxR = dot("nd,dr->nr", x_NxD, w["a_gate"], dtype)
    return row_norms(dot("nr,erf->nef", z_NxR, w["b_gate"], dtype))


__all__ = ["LatentExperts", "RANK"]
