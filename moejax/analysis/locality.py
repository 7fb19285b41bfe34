"""Local routing consistency: how well one fixed expert set serves a whole segment.

Each sequence is cut into consecutive, non-overlapping segments of `n`
tokens (a tail shorter than n is dropped; padding tokens count as empty).
For a segment s and a set size m:

- Segment Routing best Performance, SRP(s, m) = max over expert sets M with
  |M| = m of sum_{t in s, e in M} w[t, e] / sum_{t in s, e} w[t, e]: the
  share of the segment's routing weight that the best fixed set of m
  experts covers (w = combine weights; the best set is the m experts with
  the largest weight totals, since the objective is additive).
- Segment Cache best Hit rate, SCH(s, m) = the same with w = the 0/1
  selections: the hit rate of the best expert cache of m experts loaded once
  for the segment (the oracle choice for that segment, no replacement
  within it), i.e. the share of the segment's (token, expert) activations
  that find their expert in the cache.

Both are averaged over the segments with a non-zero total. Near 1 at small
m means consecutive tokens reuse the same experts (good for expert
offloading and caching); a router with no locality gives about m/E for
top-k routing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moejax.analysis import plotting
from moejax.analysis.routing import Routing


def _check(name: str, value, hi: int, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
    raise ValueError(f"{name}={value!r}; allowed: an integer in [1, {hi}] ({what})")
  return int(value)


def segment_best_coverage(w_NxBxLxE: np.ndarray, segment_len: int, cache_size: int) -> np.ndarray:
  """[N] mean over segments of the top-`cache_size` share of the segment's totals."""
  n, b, l, e = w_NxBxLxE.shape
  seg = _check("segment_len", segment_len, l, "tokens per segment, at most the sequence length")
  m = _check("cache_size", cache_size, e, "experts, at most num_experts")
  s = l // seg
  tot_NxBxSxE = np.asarray(w_NxBxLxE, np.float64)[:, :, :s * seg].reshape(n, b, s, seg, e).sum(3)
  best = -np.sort(-tot_NxBxSxE, axis=-1)[..., :m].sum(-1)
  total = tot_NxBxSxE.sum(-1)
  live = total > 0
  ratio = np.where(live, best / np.maximum(total, 1e-300), 0.0)
  return ratio.sum((1, 2)) / np.maximum(live.sum((1, 2)), 1)


def srp(routing: Routing, segment_len: int, cache_size: int) -> np.ndarray:
  """[N] Segment Routing best Performance (module docstring)."""
  w = np.where(routing.mask_BxL[None, :, :, None], routing.weights_NxBxLxE, 0.0)
  return segment_best_coverage(w, segment_len, cache_size)


def sch(routing: Routing, segment_len: int, cache_size: int) -> np.ndarray:
  """[N] Segment Cache best Hit rate (module docstring)."""
  w = (routing.selected_NxBxLxE & routing.mask_BxL[None, :, :, None]).astype(np.float64)
  return segment_best_coverage(w, segment_len, cache_size)


def grid(routing: Routing, segment_lens: Sequence[int], cache_sizes: Sequence[int]
         ) -> dict[str, np.ndarray]:
  """{"srp", "sch"}: [N, len(segment_lens), len(cache_sizes)] for every pair."""
  out = {}
  for name, fn in (("srp", srp), ("sch", sch)):
    out[name] = np.stack([np.stack([fn(routing, s, m) for m in cache_sizes], -1)
                          for s in segment_lens], 1)
  return out


def plot_locality(values: dict[str, np.ndarray], segment_lens: Sequence[int],
                  cache_sizes: Sequence[int], layers: list[int], path: str | None = None):
  """SRP and SCH vs segment length, one line per (layer, cache size)."""
  fig = plotting.new_figure(10.0, 3.8)
  for j, (name, label) in enumerate((("srp", "SRP (weight covered)"),
                                     ("sch", "SCH (cache hit rate)"))):
    ax = fig.add_subplot(1, 2, j + 1)
    for i, layer in enumerate(layers):
      for c, m in enumerate(cache_sizes):
        ax.plot(segment_lens, values[name][i, :, c], marker="o",
                label=f"layer {layer}, m={m}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length (tokens)")
    ax.set_ylabel(label)
    ax.set_ylim(0.0, 1.05)
  ax.legend(fontsize=7, ncol=2)
  return plotting.save(fig, path)
