"""Mixture-of-Head attention (MoH): attention heads as experts, routed per query token.

Jin, Zhu, Yuan and Yan (2024), "MoH: Multi-Head Attention as Mixture-of-Head
Attention" (arXiv:2410.11842). Multi-head attention is the sum of its heads,
sum_i H_i W_O^i; MoH weights the sum, MoH(x_t) = sum_i g_i(x_t) H_i(x_t) W_O^i,
with g_i = 0 for the heads a token does not select. The first h_s heads are
shared (every token uses them), the other h_r = H - h_s are routed (each
token uses its top-k). The weights come from three linear gates on the
attention input x_t (float32):

  p = softmax(x_t W_r)            over the h_r routed heads ("router" [D, h_r])
  s = softmax(x_t W_s)            over the h_s shared heads ("shared_router"
                                  [D, h_s], only when h_s >= 2: one shared head's
                                  softmax is 1)
  [a_1, a_2] = softmax(x_t W_h)   the two-stage weighting of shared vs routed
                                  heads ("stage_router" [D, 2], when h_s >= 1;
                                  without shared heads a_2 = 1)
  g_shared_i = a_1 s_i,   g_routed_i = a_2 p_i if i is among the token's top-k p, else 0

which is Eq. 5-6 of the paper (`model.moh.renormalize=False`). With
`model.moh.renormalize=True` (the default, as the authors' released code
computes it) the top-k routed weights are renormalised to sum to k, the
shared ones scaled to sum to h_s and [a_1, a_2] to sum to 2, so a uniform
router weights every used head by exactly 1 and MoH with top_k = h_r is
plain multi-head attention (no factor 1/H on the attention output).

Balance loss (Eq. 7), reported unweighted by every layer as
"moh_load_balance": L_b = sum_i f_i P_i over the routed heads, f_i the
fraction of the batch's tokens that select head i and P_i their mean p_i;
it is k / h_r at perfect balance (the released code multiplies it by h_r).

Routing is per query token and depends on that token alone, so a token
decoded alone with the KV cache gets the routing it gets in the full pass;
every head's keys and values are computed and cached (any later query may
select any head). The heads are the plain attention's (`CausalAttention`,
moejax/model/attention.py): grouped-query attention (model.num_kv_heads;
routing picks query heads, every K/V head is computed), model.head_dim,
model.attn_bias and model.qk_norm all apply, and the parameters are the
plain attention's plus the gates. Every head is computed for every token
(dense compute, as in the paper's code) and multiplied by its weight, 0 for
an unselected head: params_active counts the Q and O slices of the shared
and k routed heads, flops_per_token every head (moejax/model/counting.py).

Config keys (`model.moh.*`):
  top_k           routed heads per token; 0 = plain attention (MoH off)
  shared_heads    h_s, the always-used heads (the first h_s of model.num_heads)
  renormalize     True: the released code's weights (uniform router = plain
                  attention); False: the paper's Eq. 5-6 probabilities
  aux_loss_weight weight of moh_load_balance (the paper's beta = 0.01)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import fail, is_int, positive, refuse_constant_gate
from moejax.layers import fan_in_init
from moejax.model.attention import CausalAttention, Decoding, attention_heads, output_projection


def enabled(cfg) -> bool:
  """Whether the model of `cfg` uses Mixture-of-Head attention."""
  moh = cfg.model.get("moh")
  return moh is not None and bool(moh.get("top_k", 0))


def aux_losses(cfg) -> tuple[AuxLoss, ...]:
  """The head router's balance loss (reported by every layer), if MoH is on."""
  if not enabled(cfg):
    return ()
  return (AuxLoss("moh_load_balance", "model.moh.aux_loss_weight", per_moe_layer=False),)


def check_config(cfg) -> None:
  """model.moh.* and the attention options MoH cannot combine with."""
  m = cfg.model
  k = m.moh.top_k
  if not is_int(k) or k < 0:
    fail("model.moh.top_k", k, "must be an integer >= 0 (0 = plain attention)")
  if not k:
    return
  if m.attention != "mha":
    fail("model.attention", m.attention, f"must be 'mha' with model.moh.top_k={k} "
         "(Mixture-of-Head attention routes the heads of multi-head attention)")
  if m.get("attn_experts", 0):
    fail("model.attn_experts", m.attn_experts, f"must be 0 with model.moh.top_k={k} "
         "(attention experts and Mixture-of-Head attention are two attention layers)")
  h, s = m.num_heads, m.moh.shared_heads
  if not is_int(s) or not 0 <= s <= h - 1:
    fail("model.moh.shared_heads", s, f"must be an integer in [0, model.num_heads - 1 = "
         f"{h - 1}] (at least one head must be routed)")
  r = h - s
  if k > r:
    fail("model.moh.top_k", k, f"must be an integer in [1, model.num_heads - "
         f"model.moh.shared_heads = {r}] (the routed heads)")
  positive(cfg, "model.moh.aux_loss_weight", allow_zero=True)
  refuse_constant_gate("model.moh.top_k", k, "model.moh.renormalize", m.moh.renormalize, r)


def head_weights(routed_TxR: jax.Array, shared_TxS: jax.Array | None,
                 stage_Tx2: jax.Array | None, num_shared: int, k: int, renormalize: bool
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-head weights g [T, h_s + h_r] (shared heads first) and the balance loss.

  routed_TxR: logits x W_r; shared_TxS: x W_s (None unless num_shared >= 2);
  stage_Tx2: x W_h (None without shared heads). Top-k ties pick the lowest
  index. Returns (g float32, {"moh_load_balance": sum_i f_i P_i}).
  """
  t, r = routed_TxR.shape
  p_TxR = jax.nn.softmax(routed_TxR.astype(jnp.float32), axis=-1)
  w_TxK, i_TxK = jax.lax.top_k(p_TxR, k)
  if renormalize:
    w_TxK = k * w_TxK / jnp.sum(w_TxK, axis=-1, keepdims=True)
  g_routed = jnp.zeros((t, r), jnp.float32).at[jnp.arange(t)[:, None], i_TxK].set(w_TxK)
  chosen_TxR = jnp.sum(jax.nn.one_hot(i_TxK, r, dtype=jnp.float32), axis=1)
  losses = {"moh_load_balance": jnp.sum(jnp.mean(chosen_TxR, 0) * jnp.mean(p_TxR, 0))}
  if not num_shared:
    return g_routed, losses
  g_shared = (jax.nn.softmax(shared_TxS.astype(jnp.float32), axis=-1) if num_shared >= 2
              else jnp.ones((t, 1), jnp.float32))
  a_Tx2 = jax.nn.softmax(stage_Tx2.astype(jnp.float32), axis=-1)
  if renormalize:
    g_shared, a_Tx2 = num_shared * g_shared, 2.0 * a_Tx2
  return jnp.concatenate([a_Tx2[:, :1] * g_shared, a_Tx2[:, 1:] * g_routed], axis=-1), losses


class HeadExperts(CausalAttention):
  """Mixture-of-Head attention on [B, L, D] -> (y [B, L, D] float32, losses).

  The plain attention's parameters (`CausalAttention`: w_qkv or w_q/w_kv,
  w_out, biases, norms) plus router [D, h_r], shared_router [D, h_s] (h_s >= 2)
  and stage_router [D, 2] (h_s >= 1). y = sum_h g[t, h] o_h[t] @ w_out[h]
  (+ b_out), one [T, H*K] x [H*K, D] matmul on the weighted heads.
  """

  top_k: int = 1
  shared_heads: int = 0
  renormalize: bool = True

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
               dec: Decoding | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, l, d = x_BxLxD.shape
    h, s = self.num_heads, self.shared_heads
    x_TxD = x_BxLxD.reshape(b * l, d).astype(jnp.float32)

    def gate(name: str, width: int) -> jax.Array:
      w_DxN = self.param(name, fan_in_init(d), (d, width))
      return jnp.dot(x_TxD, w_DxN, precision="highest")

    routed_TxR = gate("router", h - s)
    shared_TxS = gate("shared_router", s) if s >= 2 else None
    stage_Tx2 = gate("stage_router", 2) if s >= 1 else None
    g_TxH, losses = head_weights(routed_TxR, shared_TxS, stage_Tx2, s, self.top_k,
                                 self.renormalize)
    o_BxLxHxK = attention_heads(self, x_BxLxD, positions_BxL, dec)
    o_BxLxHxK = o_BxLxHxK * g_TxH.reshape(b, l, h, 1)
    return output_projection(self, o_BxLxHxK, d), losses
