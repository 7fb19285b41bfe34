"""Zero-computation experts: routed choices that cost no FFN (MoE++, LongCat-Flash).

A router may score, after its E FFN experts, Z zero-computation choices
(MoE++, Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods
with Zero-Computation Experts"; LongCat-Flash, Meituan 2025, whose
zero-computation experts are copies), in this order:

  zero      E(x) = 0
  copy      E(x) = x
  constant  E(x) = a1 * x + a2 * v, (a1, a2) = softmax(x W_c), with a learned
            vector v [D] and W_c [D, 2] per constant expert

A router declares them (`Router.zero_computation(cfg_moe)` -> a
`ZeroComputation`, moejax/moe/routers/base.py) and returns each token's
combine weight of every one, `RouterOutput.zero_weights_TxZ` [T, Z] (0 where
not picked). Its `Assignment` holds only the FFN picks (a zero-computation
pick is an invalid slot), so the dispatchers never see these choices; the
MoE layer adds `ZeroComputationExperts`' output to theirs:

  y_t += sum_z w[t, z] * E_z(x_t).

Zero experts add nothing, so a router with only zero experts (null_experts)
needs no parameters here and the layer skips the module. The constant
experts' O(D) work is done for every token (their weight is 0 where not
picked): v and W_c are counted as active parameters (moejax/model/counting.py).
Parameters, under the MoE layer's `zero_experts` scope: `v` [C, D] (starts at
0, so a constant expert starts as a scaled copy) and `w_const` [C, D, 2]
(fan-in init), C = the number of constant experts.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers import fan_in_init

KINDS = ("zero", "copy", "constant")  # in choice order after the E FFN experts


@dataclasses.dataclass(frozen=True)
class ZeroComputation:
  """How many zero-computation choices of each kind a router scores after its E experts."""

  zero: int = 0
  copy: int = 0
  constant: int = 0

  @property
  def total(self) -> int:
    """Z, the number of zero-computation choices."""
    return self.zero + self.copy + self.constant

  @property
  def computes(self) -> bool:
    """Whether any choice has an output (copy or constant experts)."""
    return self.copy + self.constant > 0

  def kind_slices(self) -> dict[str, slice]:
    """{kind: its columns of a [T, Z] weight matrix}."""
    out, start = {}, 0
    for kind in KINDS:
      n = getattr(self, kind)
      out[kind] = slice(start, start + n)
      start += n
    return out

  def param_count(self, d_model: int) -> int:
    """v [D] and W_c [D, 2] per constant expert."""
    return self.constant * 3 * d_model


def zero_computation_output(x_TxD: jax.Array, weight_TxZ: jax.Array, spec: ZeroComputation,
                            v_CxD: jax.Array | None = None,
                            w_const_CxDx2: jax.Array | None = None) -> jax.Array:
  """sum_z weight[t, z] * E_z(x_t) [T, D] float32 (pure; float32 whatever x's dtype)."""
  x = x_TxD.astype(jnp.float32)
  w = weight_TxZ.astype(jnp.float32)
  cols = spec.kind_slices()
  y_TxD = jnp.zeros_like(x)
  if spec.copy:
    y_TxD = y_TxD + jnp.sum(w[:, cols["copy"]], axis=-1, keepdims=True) * x
  if spec.constant:
    a_TxCx2 = jax.nn.softmax(
        jnp.einsum("td,cdk->tck", x, w_const_CxDx2.astype(jnp.float32), precision="highest"),
        axis=-1)
    wc_TxC = w[:, cols["constant"]]
    y_TxD = y_TxD + jnp.sum(wc_TxC * a_TxCx2[..., 0], axis=-1, keepdims=True) * x
    y_TxD = y_TxD + jnp.dot(wc_TxC * a_TxCx2[..., 1], v_CxD.astype(jnp.float32),
                            precision="highest")
  return y_TxD


class ZeroComputationExperts(nn.Module):
  """The copy and constant experts' output [T, D] float32 from the router's weights [T, Z]."""

  spec: ZeroComputation

  @nn.compact
  def __call__(self, x_TxD: jax.Array, weight_TxZ: jax.Array) -> jax.Array:
    c, d = self.spec.constant, x_TxD.shape[-1]
    v_CxD = w_CxDx2 = None
    if c:
      v_CxD = self.param("v", nn.initializers.zeros, (c, d))
      w_CxDx2 = self.param("w_const", fan_in_init(d), (c, d, 2))
    return zero_computation_output(x_TxD, weight_TxZ, self.spec, v_CxD, w_CxDx2)
