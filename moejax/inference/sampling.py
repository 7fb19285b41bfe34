"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), pure functions.

`Sampling` holds the settings (validated once, with errors naming the
option); `sample(logits_BxV, keys_B, sampling)` draws one token per row with
that row's own PRNG key, so a sequence's sample does not depend on which
other sequences share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """greedy: argmax (the other fields are ignored); else softmax(logits / temperature)
  restricted to the top_k most likely tokens (0: all) and to the smallest set whose
  probability reaches top_p (1.0: all)."""

  greedy: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.greedy:
      return
    t, k, p = self.temperature, self.top_k, self.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
      raise ValueError(f"--temperature {t!r} is not allowed: sampling needs a temperature "
                       "> 0 (use --greedy for argmax decoding)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(f"--top-k {k!r} is not allowed: it must be an integer >= 0 (0: off)")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f"--top-p {p!r} is not allowed: it must lie in (0, 1] (1: off)")


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """float32 logits with the tokens outside top-k / the top-p nucleus set to -inf.

  The nucleus keeps, in descending probability, every token whose preceding
  mass is below top_p (so the most likely token always stays).
  """
  x = logits_BxV.astype(jnp.float32)
  v = x.shape[-1]
  if top_k and top_k < v:
    kth_B1 = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x < kth_B1, -jnp.inf, x)
  if top_p < 1.0:
    order_BxV = jnp.argsort(-x, axis=-1)
    sorted_BxV = jnp.take_along_axis(x, order_BxV, axis=-1)
    p = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p, axis=-1) - p
    keep_sorted = before_BxV < top_p
    keep_BxV = jnp.zeros_like(keep_sorted).at[
        jnp.arange(x.shape[0])[:, None], order_BxV].set(keep_sorted)
    x = jnp.where(keep_BxV, x, -jnp.inf)
  return x


def sample(logits_BxV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """int32 [B] next tokens."""
  if s.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x = filter_logits(logits_BxV.astype(jnp.float32) / s.temperature, s.top_k, s.top_p)
  return jax.vmap(jax.random.categorical)(keys_B, x).astype(jnp.int32)
