"""Expert offloading simulator: replay a routing trace against a GPU-resident expert cache.

Why: a model whose experts do not fit in GPU memory keeps them in host memory
and copies the ones a token needs over the host link; how often that copy
stalls decoding depends on the cache policy and on how well the next
layer's experts can be guessed. This module measures both on real routing.

All experts live in host memory; the GPU holds a cache of C experts per MoE
layer (`scope="layer"`, one cache per layer) or C in total (`scope="global"`,
one cache keyed by (layer, expert)). Tokens are replayed in trace order
(sequence by sequence, token by token, layer by layer, as a decoder meets
them) from an empty cache that persists across sequences. Each expert a
token needs in a layer is a request; one not resident is a demand miss and
is loaded, evicting a resident expert chosen by the policy but never one the
same token needs in that layer (so C is at least K, the most experts one
token uses in one layer).

Policies (`POLICIES`):

- `lru`: evict the least recently used (or loaded) expert;
- `lfu`: evict the expert requested least often so far in the replay (counts
  kept across evictions; ties: least recently used);
- `score_ema`: keep the experts with the highest exponential moving average
  of their gate weight, s <- decay * s + (1 - decay) * w at every token (w = 0
  when the token does not use the expert; `decay` default 0.9); ties: LRU;
- `belady`: evict the expert whose next request is furthest in the future
  (never again first; ties: LRU). Offline and optimal for the hit rate among
  demand-paging policies, so an upper bound for lru, lfu and score_ema; a
  prefetching policy loads ahead of demand and can beat it.
- `lru+prefetch_affinity`, `lru+prefetch_predictor`: LRU plus prefetching.
  Once layer n's experts are resolved, the `prefetch_k` experts predicted for
  the same token at layer n + 1 are loaded into that layer's cache (as most
  recently used, evicting by LRU; in the global scope never one of layer n's
  experts in use). Nothing is prefetched into the first MoE layer.
  affinity: A[i, j] = P(expert j at n + 1 | expert i at n), counted on the
  fitting part of the trace (a row never seen: layer n + 1's expert
  frequencies); the prediction is the top prefetch_k of the sum of A's rows
  over the token's experts at layer n. predictor: a multinomial logistic
  regression per layer transition (NumPy), from layer n's router
  probabilities `probs_TxNxE` when the trace stores them, else its
  chosen-expert multi-hot, to layer n + 1's experts (soft target: the
  multi-hot over its count), fitted on the fitting part by `predictor_steps`
  steps of full-batch gradient descent from a seeded start.

prefetch_accuracy = the share of prefetched experts (per token and layer, the
experts issued, resident already or not) that the token then used in that
layer; prefetch_recall = the share of requests at layers >= 1 that were
among the prefetched experts. Both are None for demand-only policies.

Latency model, per token and MoE layer: max(compute, prefetch transfer) +
demand stall. compute = active experts * 2 * 3 * d_model * expert_hidden
FLOPs (a SwiGLU expert's three matmuls) at the GPU's dense bf16 TFLOP/s (a
lower bound: batch-1 decoding is memory-bound); prefetch transfer = bytes
prefetched for layer n + 1 while layer n computes; stall = bytes of the
layer's demand misses; both transfers over the host link. bytes_moved =
(demand misses + prefetch loads) * bytes_per_expert (3 * d_model *
expert_hidden * dtype_bytes). Attention, the router and dense layers are not
modelled.

Defaults (all overridable, `hardware`): host link `PCIE4_X16_GBPS` = 25 GB/s,
the effective host-to-device rate of PCIe 4.0 x16 (32 GB/s raw per
direction: 16 GT/s per lane x 16 lanes, 128b/130b encoding) from pinned
memory. `GPU_TFLOPS`: the vendors' datasheet dense bf16 tensor TFLOP/s
without sparsity: RTX 4090 165, A100 312, H100 (SXM) 989.

Evaluation (`evaluate`): the first `train_fraction` of the sequences fit the
affinity table and the predictor; every policy is replayed on the remaining
sequences only, so all rows are comparable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from moejax.inference import trace as trace_lib
from moejax.inference.trace import Trace

PCIE4_X16_GBPS = 25.0
GPU_TFLOPS = {"rtx4090": 165.0, "a100": 312.0, "h100": 989.0}
DEFAULT_GPU = "rtx4090"
DEMAND_POLICIES = ("lru", "lfu", "score_ema", "belady")
PREFETCHERS = ("affinity", "predictor")
POLICIES = DEMAND_POLICIES + tuple(f"lru+prefetch_{p}" for p in PREFETCHERS)
SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What the latency model reads: GPU throughput, host link, bytes per weight."""

  tflops: float = GPU_TFLOPS[DEFAULT_GPU]  # dense bf16 tensor TFLOP/s
  bandwidth_gbps: float = PCIE4_X16_GBPS  # host -> GPU, GB/s (1e9 bytes/s)
  dtype_bytes: int = 2  # bytes per expert weight (2: bf16)


def _positive(name: str, value, integer: bool = False):
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
      or not value > 0:
    raise ValueError(f"{name}={value!r}; allowed: a positive {'integer' if integer else 'number'}")
  return value


def hardware(gpu: str = DEFAULT_GPU, *, tflops: float | None = None,
             bandwidth_gbps: float | None = None, dtype_bytes: int = 2,
             arg_name: str = "gpu") -> Hardware:
  """A `Hardware` for a listed GPU (`GPU_TFLOPS`), any number overridden."""
  if gpu not in GPU_TFLOPS:
    raise ValueError(f"{arg_name}={gpu!r} is not a listed GPU; allowed: {', '.join(GPU_TFLOPS)}")
  return Hardware(
      tflops=float(_positive("tflops", GPU_TFLOPS[gpu] if tflops is None else tflops)),
      bandwidth_gbps=float(_positive("bandwidth_gbps", PCIE4_X16_GBPS if bandwidth_gbps is None
                                     else bandwidth_gbps)),
      dtype_bytes=int(_positive("dtype_bytes", dtype_bytes, integer=True)))


def check_policy(name: str, arg_name: str = "policy") -> str | None:
  """The prefetcher of policy `name` (None: demand paging); ValueError naming `arg_name`."""
  if name not in POLICIES:
    raise ValueError(f"{arg_name}={name!r} is not a policy; allowed: {', '.join(POLICIES)}")
  return name.partition("+prefetch_")[2] or None


def cache_limits(trace: Trace, scope: str) -> tuple[int, int]:
  """(smallest, largest) cache size: K, the most experts a token uses in one layer, and
  E (scope="layer") or N * E (scope="global")."""
  if scope not in SCOPES:
    raise ValueError(f"scope={scope!r}; allowed: {', '.join(SCOPES)}")
  k = max(1, int((trace.experts_TxNxK >= 0).sum(-1).max(initial=0)))
  e = trace.num_experts
  return k, (e if scope == "layer" else trace.num_layers * e)


def check_cache_size(cache_size, trace: Trace, scope: str, arg_name: str = "cache_size") -> int:
  """`cache_size` as an int; ValueError naming `arg_name` outside `cache_limits`."""
  lo, hi = cache_limits(trace, scope)
  what = "per layer" if scope == "layer" else "in total over the layers"
  if isinstance(cache_size, bool) or not isinstance(cache_size, (int, np.integer)) \
      or not lo <= cache_size <= hi:
    raise ValueError(f"{arg_name}={cache_size!r}; allowed with scope={scope!r}: an integer in "
                     f"[{lo}, {hi}] experts {what} (at least the {lo} experts a token uses in "
                     f"one layer, at most all {hi})")
  return int(cache_size)


# --------------------------------------------------------------------------- prefetchers


def fit_affinity(trace: Trace) -> np.ndarray:
  """float64 [N - 1, E, E]: P(expert j at layer n + 1 | expert i at layer n) on `trace`
  (a row whose expert is never used: layer n + 1's expert frequencies)."""
  sel_TxNxE = trace.selected().astype(np.float64)
  n, e = trace.num_layers, trace.num_experts
  table = np.zeros((max(n - 1, 0), e, e))
  for i in range(n - 1):
    counts_ExE = sel_TxNxE[:, i].T @ sel_TxNxE[:, i + 1]
    rows_E = counts_ExE.sum(1)
    nxt_E = sel_TxNxE[:, i + 1].sum(0)
    marginal_E = nxt_E / nxt_E.sum() if nxt_E.sum() > 0 else np.full(e, 1.0 / e)
    table[i] = np.where(rows_E[:, None] > 0, counts_ExE / np.maximum(rows_E[:, None], 1e-300),
                        marginal_E[None])
  return table


def _top(score_TxE: np.ndarray, k: int) -> np.ndarray:
  """int32 [T, k]: the k highest scores' experts (ties: lower index)."""
  return np.argsort(-score_TxE, axis=-1, kind="stable")[:, :k].astype(np.int32)


def predict_affinity(table_MxExE: np.ndarray, trace: Trace, k: int) -> np.ndarray:
  """int32 [T, N - 1, k]: each token's top-k experts at layer n + 1, by the sum of the
  affinity rows of its experts at layer n."""
  sel_TxNxE = trace.selected().astype(np.float64)
  out = np.zeros((trace.num_tokens, trace.num_layers - 1, k), np.int32)
  for i in range(trace.num_layers - 1):
    out[:, i] = _top(sel_TxNxE[:, i] @ table_MxExE[i], k)
  return out


def _features(trace: Trace, layer: int) -> np.ndarray:
  """float32 [T, C]: layer's router probabilities, else its chosen-expert multi-hot."""
  if trace.probs_TxNxE is not None:
    return trace.probs_TxNxE[:, layer].astype(np.float32)
  return trace.selected()[:, layer].astype(np.float32)


def fit_softmax_regression(x_TxC: np.ndarray, y_TxE: np.ndarray, *, steps: int = 300,
                           l2: float = 1e-4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(W [C, E], b [E]) of softmax(x W + b) fitted to the soft targets y (rows summing to 1)
  by full-batch gradient descent on the mean cross-entropy + l2 |W|^2 / 2.

  The step is 1 / L, L = |[x, 1]|_2^2 / (2 T) + l2 bounding the loss's curvature (the
  softmax cross-entropy's Hessian in the logits is at most I / 2), so descent is monotone
  without a tuned learning rate. W starts at seeded N(0, 0.01^2) values.
  """
  steps = int(_positive("steps", steps, integer=True))
  if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
    raise ValueError(f"l2={l2!r}; allowed: a number >= 0")
  x = np.asarray(x_TxC, np.float32)
  y = np.asarray(y_TxE, np.float32)
  t, c = x.shape
  e = y.shape[1]
  xa = np.concatenate([x, np.ones((t, 1), np.float32)], axis=1)
  gram = (xa.T.astype(np.float64) @ xa) / max(t, 1)
  lr = 1.0 / (0.5 * float(np.linalg.eigvalsh(gram)[-1]) + l2)
  wa = np.zeros((c + 1, e), np.float32)
  wa[:c] = np.random.default_rng(seed).normal(0.0, 0.01, (c, e))
  decay = np.ones((c + 1, 1), np.float32)
  decay[c] = 0.0  # no penalty on the bias
  for _ in range(steps):
    logits = xa @ wa
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    grad = xa.T @ (p - y) / max(t, 1) + l2 * decay * wa
    wa -= lr * grad
  return wa[:c], wa[c]


def fit_predictor(trace: Trace, *, steps: int = 300, l2: float = 1e-4, seed: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per layer transition n -> n + 1, (W, b) of `fit_softmax_regression` from layer n's
  features (router probabilities, else chosen-expert multi-hot) to layer n + 1's experts."""
  sel_TxNxE = trace.selected().astype(np.float32)
  params = []
  for i in range(trace.num_layers - 1):
    nxt_TxE = sel_TxNxE[:, i + 1]
    y_TxE = nxt_TxE / np.maximum(nxt_TxE.sum(-1, keepdims=True), 1.0)
    params.append(fit_softmax_regression(_features(trace, i), y_TxE, steps=steps, l2=l2,
                                         seed=seed + i))
  return params


def predict_predictor(params: Sequence[tuple[np.ndarray, np.ndarray]], trace: Trace, k: int
                      ) -> np.ndarray:
  """int32 [T, N - 1, k]: each token's top-k experts at layer n + 1 by the regression."""
  if len(params) != trace.num_layers - 1:
    raise ValueError(f"params holds {len(params)} layer transitions; the trace has "
                     f"{trace.num_layers - 1}")
  out = np.zeros((trace.num_tokens, trace.num_layers - 1, k), np.int32)
  for i, (w, b) in enumerate(params):
    x = _features(trace, i)
    if x.shape[1] != w.shape[0]:
      raise ValueError(f"the predictor was fitted on {w.shape[0]} features; the trace gives "
                       f"{x.shape[1]} at MoE layer {i}")
    out[:, i] = _top(x @ w + b, k)
  return out


# --------------------------------------------------------------------------- the cache


def _next_uses(trace: Trace) -> dict[tuple[int, int], np.ndarray]:
  """(layer, expert) -> sorted int64 steps (token * N + layer) that request it."""
  n, e = trace.num_layers, trace.num_experts
  ti, ni, ki = np.nonzero(trace.experts_TxNxK >= 0)
  keys = ni.astype(np.int64) * e + trace.experts_TxNxK[ti, ni, ki]
  steps = ti.astype(np.int64) * n + ni
  order = np.lexsort((steps, keys))
  keys, steps = keys[order], steps[order]
  cuts = np.flatnonzero(np.diff(keys)) + 1
  return {(int(ks[0]) // e, int(ks[0]) % e): ss
          for ks, ss in zip(np.split(keys, cuts), np.split(steps, cuts)) if ks.size}


class _Cache:
  """One cache's resident keys and the per-key state its eviction policy reads."""

  def __init__(self, capacity: int, policy: str, decay: float,
               uses: dict[tuple[int, int], np.ndarray]):
    self.capacity, self.policy, self.decay, self.uses = capacity, policy, decay, uses
    self.resident: set[tuple[int, int]] = set()
    self.last: dict[tuple[int, int], int] = {}  # tick of the last request or load
    self.count: dict[tuple[int, int], int] = {}  # requests so far
    self.ema: dict[tuple[int, int], tuple[float, int]] = {}  # (score, token of that score)

  def _ema(self, key, token: int) -> float:
    s, t0 = self.ema.get(key, (0.0, token))
    return s * self.decay ** (token - t0)

  def request(self, key, tick: int, token: int, weight: float) -> None:
    self.last[key] = tick
    self.count[key] = self.count.get(key, 0) + 1
    self.ema[key] = (self._ema(key, token) + (1 - self.decay) * weight, token)

  def _rank(self, key, step: int, token: int) -> tuple:
    """Smaller is evicted first."""
    if self.policy == "lru":
      return (self.last[key],)
    if self.policy == "lfu":
      return (self.count.get(key, 0), self.last[key])
    if self.policy == "score_ema":
      return (self._ema(key, token), self.last[key])
    steps = self.uses.get(key)  # belady
    j = 0 if steps is None else int(np.searchsorted(steps, step, side="right"))
    nxt = math.inf if steps is None or j == steps.size else int(steps[j])
    return (-nxt, self.last[key])

  def load(self, key, pinned: set, tick: int, step: int, token: int) -> None:
    if len(self.resident) >= self.capacity:
      victim = min((k for k in self.resident if k not in pinned),
                   key=lambda k: self._rank(k, step, token))
      self.resident.remove(victim)
    self.resident.add(key)
    self.last[key] = tick


def simulate(trace: Trace, cache_size: int, policy: str, *, scope: str = "layer",
             predicted_TxMxP: np.ndarray | None = None, hw: Hardware = Hardware(),
             decay: float = 0.9) -> dict:
  """Replay `trace` through one cache configuration; one report row (module docstring).

  predicted_TxMxP: for the prefetching policies, the experts to prefetch for each token
  at MoE layers 1..N-1 (`predict_affinity` / `predict_predictor` on `trace`).
  """
  pre = check_policy(policy)
  cap = check_cache_size(cache_size, trace, scope)
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
    raise ValueError(f"decay={decay!r}; allowed: a number in [0, 1)")
  t_all, n, _ = trace.experts_TxNxK.shape
  if pre is not None:
    if predicted_TxMxP is None:
      raise ValueError(f"policy={policy!r} prefetches: give predicted_TxMxP")
    pred = np.asarray(predicted_TxMxP)
    if pred.ndim != 3 or pred.shape[:2] != (t_all, n - 1):
      raise ValueError(f"predicted_TxMxP has shape {pred.shape}; allowed: ({t_all}, {n - 1}, P)")
  base = "lru" if pre is not None else policy
  d, h = trace_lib.expert_shape(trace.model, "trace")
  bpe = trace_lib.bytes_per_expert(trace.model, hw.dtype_bytes)
  compute_s = 2 * 3 * d * h / (hw.tflops * 1e12)  # one expert for one token
  load_s = bpe / (hw.bandwidth_gbps * 1e9)
  uses = _next_uses(trace) if base == "belady" else {}
  caches = ([_Cache(cap, base, decay, uses) for _ in range(n)] if scope == "layer"
            else [_Cache(cap, base, decay, uses)] * n)
  experts, weights = trace.experts_TxNxK, trace.weights_TxNxK
  tick = requests = hits = prefetch_loads = issued = issued_used = 0
  total_s = compute_total_s = 0.0
  prefetched: set[tuple[int, int]] = set()  # issued for the current token's next layer
  for t in range(t_all):
    for i in range(n):
      step, cache = t * n + i, caches[i]
      row = [(int(e), float(w)) for e, w in zip(experts[t, i], weights[t, i]) if e >= 0]
      pinned = {(i, e) for e, _ in row}
      issued_used += len(pinned & prefetched)
      misses = 0
      for e, w in row:
        tick += 1
        if (i, e) in cache.resident:
          hits += 1
        else:
          misses += 1
          cache.load((i, e), pinned, tick, step, t)
        cache.request((i, e), tick, t, w)
      requests += len(row)
      fetched = 0
      prefetched = set()
      if pre is not None and i + 1 < n:
        target = caches[i + 1]
        room = cap - (len(pinned) if scope == "global" else 0)
        keys = [(i + 1, int(e)) for e in dict.fromkeys(pred[t, i].tolist())][:max(room, 0)]
        keep = set(keys) | (pinned if scope == "global" else set())
        for key in keys:
          tick += 1
          if key in target.resident:
            target.last[key] = tick  # predicted again: most recently used
          else:
            target.load(key, keep, tick, step, t)
            fetched += 1
        prefetched = set(keys)
        issued += len(keys)
        prefetch_loads += fetched
      compute = len(row) * compute_s
      compute_total_s += compute
      total_s += max(compute, fetched * load_s) + misses * load_s
  accuracy = recall = None
  if pre is not None:
    later = int((experts[:, 1:] >= 0).sum())
    accuracy = issued_used / issued if issued else 0.0
    recall = issued_used / later if later else 0.0
  demand_misses = requests - hits
  return {"policy": policy, "cache_size": cap, "scope": scope,
          "hit_rate": hits / requests if requests else 0.0,
          "bytes_moved": (demand_misses + prefetch_loads) * bpe,
          "latency_ms_per_token": 1e3 * total_s / t_all if t_all else 0.0,
          "prefetch_accuracy": accuracy, "prefetch_recall": recall,
          "compute_ms_per_token": 1e3 * compute_total_s / t_all if t_all else 0.0,
          "requests": requests, "misses": demand_misses, "prefetch_loads": prefetch_loads,
          "tokens": t_all}


def evaluate(trace: Trace, cache_sizes: Sequence[int], policies: Sequence[str], *,
             scope: str = "layer", train_fraction: float = 0.5, hw: Hardware = Hardware(),
             decay: float = 0.9, prefetch_k: int | None = None, predictor_steps: int = 300,
             seed: int = 0) -> list[dict]:
  """One row per (policy, cache size), in that order: prefetchers fitted on the first
  `train_fraction` of the sequences, every policy replayed on the rest.
  prefetch_k (experts prefetched per token and layer) defaults to K."""
  policies, cache_sizes = list(policies), list(cache_sizes)
  if not policies:
    raise ValueError(f"policies is empty; allowed: one or more of {', '.join(POLICIES)}")
  if not cache_sizes:
    raise ValueError("cache_sizes is empty; allowed: one or more cache sizes")
  kinds = {check_policy(p) for p in policies} - {None}
  sizes = [check_cache_size(c, trace, scope) for c in cache_sizes]
  if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
      or not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction={train_fraction!r}; allowed: a number in (0, 1)")
  k = cache_limits(trace, scope)[0] if prefetch_k is None else prefetch_k
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) \
      or not 1 <= k <= trace.num_experts:
    raise ValueError(f"prefetch_k={prefetch_k!r}; allowed: an integer in [1, "
                     f"{trace.num_experts}] (experts prefetched per token and layer)")
  if kinds and trace.num_layers < 2:
    raise ValueError("prefetching predicts layer n + 1 from layer n; the trace has one MoE "
                     f"layer (policies {policies})")
  fit, held = trace.split(train_fraction)
  predicted = {}
  if "affinity" in kinds:
    predicted["affinity"] = predict_affinity(fit_affinity(fit), held, int(k))
  if "predictor" in kinds:
    params = fit_predictor(fit, steps=predictor_steps, seed=seed)
    predicted["predictor"] = predict_predictor(params, held, int(k))
  return [simulate(held, c, p, scope=scope, predicted_TxMxP=predicted.get(check_policy(p)),
                   hw=hw, decay=decay)
          for p in policies for c in sizes]
