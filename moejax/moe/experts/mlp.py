"""Two-matrix MLP experts (`moe.expert="mlp"`): y = act(x W_in + b_in) W_out + b_out.

Options under `moe.mlp`:
  activation: "gelu" (exact, erf), "gelu_tanh" (tanh approximation), "relu",
      "relu2" (squared ReLU, So et al. 2021), "silu".
  bias: biases b_in [E, F] and b_out [E, D] (zero-initialised); without
      them the leaves are w_in [E, D, F] and w_out [E, F, D] only.
The ragged path is two `pallas_kernels.gmm` calls (their custom VJP gives the
gradients); the biases are gathered per row from its expert, and rows outside
this call's experts (other expert shards, rows past the groups) get none, so
they come out zero like gmm's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from moejax.checks import choice
from moejax.layers import dot
from moejax.moe.experts.base import ExpertFamily, Leaf, group_of_rows, row_norms

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class MLPExperts(ExpertFamily):
  """The classic Transformer FFN as an expert (Switch, GShard, GPT-style MoEs)."""

  name = "mlp"
  activation: str = "gelu"
  bias: bool = False

  @classmethod
  def from_config(cls, cfg_moe) -> "MLPExperts":
    return cls(cfg_moe.mlp.activation, cfg_moe.mlp.bias)

  @classmethod
  def check_config(cls, cfg) -> None:
    choice(cfg.moe.mlp.activation, "moe.mlp.activation", ACTIVATIONS)

  def leaves(self) -> dict[str, Leaf]:
    out = {"w_in": Leaf(("E", "D", "F"), fan_in="D", fsdp="F")}
    if self.bias:
      out["b_in"] = Leaf(("E", "F"), init="zeros", fsdp="F")
    out["w_out"] = Leaf(("E", "F", "D"), fan_in="F", output=True, fsdp="F")
    if self.bias:
      out["b_out"] = Leaf(("E", "D"), init="zeros", output=True)
    return out

  def batched(self, w: dict, x_ExCxD: jax.Array, dtype) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    h = dot("ecd,edf->ecf", x_ExCxD, w["w_in"], dtype)
    if self.bias:
      h = h + w["b_in"][:, None, :]
    y = dot("ecf,efd->ecd", act(h), w["w_out"], dtype)
    if self.bias:
      y = y + w["b_out"][:, None, :]
    return y

  def grouped(self, w: dict, x_AxD: jax.Array, group_sizes: jax.Array, dtype, *,
              backend: str = "auto", group_offset: Any = None,
              scale_A: jax.Array | None = None) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    f32 = jnp.float32
    def gmm(lhs, rhs):
      return pallas_kernels.gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes,
                                preferred_element_type=f32, group_offset=group_offset,
                                backend=backend)
    h = gmm(x_AxD, w["w_in"])
    if self.bias:
      e_loc = w["b_in"].shape[0]
      local_A = group_of_rows(group_sizes, x_AxD.shape[0]) - (
          0 if group_offset is None else group_offset)
      mine_A = ((local_A >= 0) & (local_A < e_loc)).astype(f32)[:, None]
      idx_A = jnp.clip(local_A, 0, e_loc - 1)
      h = h + w["b_in"][idx_A] * mine_A
    y = gmm(act(h), w["w_out"])  # rows of other groups: zero whatever act(h) is
    if self.bias:
      y = y + w["b_out"][idx_A] * mine_A
    if scale_A is not None:
      y = y * scale_A[:, None].astype(f32)
    return y

  def activation_norms(self, w: dict, x_NxD: jax.Array, dtype) -> jax.Array:
    """||x W_in^e + b_in^e||: the input projection, what the activation reads."""
    h = dot("nd,edf->nef", x_NxD, w["w_in"], dtype)
    if self.bias:
      h = h + w["b_in"][None]
    return row_norms(h)

  def dense(self, w: dict, x_TxD: jax.Array, dtype) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    h = dot("td,df->tf", x_TxD, w["w_in"], dtype)
    if self.bias:
      h = h + w["b_in"]
    y = dot("tf,fd->td", act(h), w["w_out"], dtype)
    return y + w["b_out"] if self.bias else y
