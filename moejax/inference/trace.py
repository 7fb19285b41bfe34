"""Routing traces: which experts each token used in each MoE layer, as one compact file.

A `Trace` stores T tokens x N MoE layers x K slots: the chosen experts (-1
where a slot is empty; K = the most experts any token used in one layer),
sorted by combine weight descending, with their weights, plus each token's
id, position and sequence, optionally the router probabilities (float16, for
prefetch predictors), and a fingerprint of the model that produced it
(`fingerprint`), so a simulator can size experts and refuse a trace of
another model (`check_model`). Traces come from generation
(`tools/generate.py --trace`, tokens in decoding order) or from evaluation of
a run on its validation split or given texts (`capture`,
`tools/capture_trace.py`), and convert to and from
`moejax.analysis.routing.Routing` (`from_routing`, `to_routing`), so every
routing analysis reads them.

Tokens are stored sequence by sequence, in order of position within a
sequence: the order in which a decoder meets them, which the offloading
simulator replays.

File format: one .npz (`save` / `load`, np.savez_compressed) holding the
arrays under their field names and "meta", a JSON string {"format",
"layers", "num_experts", "model"}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from moejax.moe import pool as pool_lib

FORMAT = "moejax-trace-1"
FINGERPRINT_KEYS = ("num_layers", "d_model", "num_experts", "top_k", "router", "expert_hidden",
                    "dtype")
ARRAYS = ("experts_TxNxK", "weights_TxNxK", "token_ids_T", "positions_T", "sequence_T")


def fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model facts a trace depends on, and the expert size the simulators read.

  expert_hidden is the FFN width of one expert (`moe.expert_hidden`, 0 meaning
  `model.ffn_hidden`); dtype is the compute dtype `model.dtype`.
  """
  m, moe = cfg.model, cfg.moe
  return {"num_layers": int(m.num_layers), "d_model": int(m.d_model),
          "num_experts": int(moe.num_experts), "top_k": int(moe.top_k),
          "router": str(moe.router), "expert_hidden": int(moe.expert_hidden or m.ffn_hidden),
          "dtype": str(m.dtype)}


def _as_fingerprint(fp: dict[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  return fingerprint(fp) if isinstance(fp, ml_collections.ConfigDict) else dict(fp)


def expert_shape(fp: dict[str, Any] | ml_collections.ConfigDict, arg_name: str = "model"
                 ) -> tuple[int, int]:
  """(d_model, expert_hidden) of a fingerprint or config; ValueError naming `arg_name`
  when the fingerprint lacks them (a trace built from a bare Routing)."""
  fp = _as_fingerprint(fp)
  missing = [k for k in ("d_model", "expert_hidden") if k not in fp]
  if missing:
    raise ValueError(f"{arg_name}: the model fingerprint lacks {missing} (it holds "
                     f"{sorted(fp)}); capture the trace with moejax.inference.trace.capture or "
                     "pass model=cfg to from_routing")
  d, h = fp["d_model"], fp["expert_hidden"]
  for name, v in (("d_model", d), ("expert_hidden", h)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{arg_name}: fingerprint {name}={v!r}; allowed: a positive integer")
  return int(d), int(h)


def bytes_per_expert(fp: dict[str, Any] | ml_collections.ConfigDict, dtype_bytes: int = 2
                     ) -> int:
  """Weight bytes of one SwiGLU expert: 3 * d_model * expert_hidden parameters."""
  if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, (int, np.integer)) \
      or dtype_bytes < 1:
    raise ValueError(f"dtype_bytes={dtype_bytes!r}; allowed: a positive integer (2 for bf16)")
  d, h = expert_shape(fp)
  return 3 * d * h * int(dtype_bytes)


def _int_array(name: str, x, ndim: int) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != ndim or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
    raise ValueError(f"{name} is a {a.dtype} array of shape {a.shape}; allowed: a {ndim}-D "
                     "integer array")
  return a.astype(np.int32)


def _float_array(name: str, x, ndim: int, dtype) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != ndim or not (np.issubdtype(a.dtype, np.floating) or a.size == 0):
    raise ValueError(f"{name} is a {a.dtype} array of shape {a.shape}; allowed: a {ndim}-D "
                     "float array")
  if not np.isfinite(a).all():
    raise ValueError(f"{name} holds non-finite values; allowed: finite floats")
  return a.astype(dtype)


@dataclasses.dataclass
class Trace:
  """T tokens' routing through N MoE layers (NumPy arrays; see the module docstring).

  Construction checks shapes and values and casts the arrays to their
  dtypes (int32, float32, float16 for probs).
  """

  experts_TxNxK: np.ndarray  # int32, -1: empty slot; by weight descending
  weights_TxNxK: np.ndarray  # float32, 0 on empty slots
  token_ids_T: np.ndarray  # int32
  positions_T: np.ndarray  # int32: position in its sequence
  sequence_T: np.ndarray  # int32: which sequence
  layers: list[int]  # model layer index of each of the N MoE layers
  num_experts: int
  model: dict[str, Any]  # fingerprint(cfg) of the producing model
  probs_TxNxE: np.ndarray | None = None  # float16 router probabilities over C choices

  def __post_init__(self):
    self.experts_TxNxK = _int_array("experts_TxNxK", self.experts_TxNxK, 3)
    self.weights_TxNxK = _float_array("weights_TxNxK", self.weights_TxNxK, 3, np.float32)
    t, n, k = self.experts_TxNxK.shape
    if self.weights_TxNxK.shape != (t, n, k):
      raise ValueError(f"weights_TxNxK has shape {self.weights_TxNxK.shape}; "
                       f"allowed: {(t, n, k)} like experts_TxNxK")
    for name in ARRAYS[2:]:
      a = _int_array(name, getattr(self, name), 1)
      if a.shape != (t,):
        raise ValueError(f"{name} has shape {a.shape}; allowed: ({t},), one per token")
      if a.size and a.min() < 0:
        raise ValueError(f"{name} holds {a.min()}; allowed: non-negative integers")
      setattr(self, name, a)
    e = self.num_experts
    if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1:
      raise ValueError(f"num_experts={e!r}; allowed: a positive integer")
    self.num_experts = int(e)
    self.layers = [int(x) for x in self.layers]
    if len(self.layers) != n:
      raise ValueError(f"layers lists {len(self.layers)} layers; the arrays hold {n}")
    x = self.experts_TxNxK
    if x.size and (x.min() < -1 or x.max() >= e):
      raise ValueError(f"experts_TxNxK must lie in [-1, {e}); got [{x.min()}, {x.max()}]")
    if (self.weights_TxNxK[x < 0] != 0).any():
      raise ValueError("weights_TxNxK is non-zero on empty slots (experts_TxNxK == -1); "
                       "allowed: 0 there")
    if not isinstance(self.model, dict):
      raise ValueError(f"model is a {type(self.model).__name__}; allowed: a dict (fingerprint)")
    if self.probs_TxNxE is not None:
      p = _float_array("probs_TxNxE", self.probs_TxNxE, 3, np.float16)
      if p.shape[:2] != (t, n) or p.shape[2] < 1:
        raise ValueError(f"probs_TxNxE has shape {p.shape}; allowed: ({t}, {n}, C), "
                         "C >= 1 router choices")
      self.probs_TxNxE = p

  @property
  def num_tokens(self) -> int:
    return int(self.experts_TxNxK.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.experts_TxNxK.shape[1])

  @property
  def max_experts(self) -> int:
    """K: the most experts one token uses in one layer (slot count)."""
    return int(self.experts_TxNxK.shape[2])

  def select(self, rows: np.ndarray) -> Trace:
    """The tokens at `rows` (an index or bool array), in that order."""
    return dataclasses.replace(
        self, experts_TxNxK=self.experts_TxNxK[rows], weights_TxNxK=self.weights_TxNxK[rows],
        token_ids_T=self.token_ids_T[rows], positions_T=self.positions_T[rows],
        sequence_T=self.sequence_T[rows],
        probs_TxNxE=None if self.probs_TxNxE is None else self.probs_TxNxE[rows])

  def split(self, fraction: float) -> tuple[Trace, Trace]:
    """(the tokens of the first `fraction` of the sequences, in order of first appearance,
    the rest): fit on one, evaluate on the other. Each part holds at least one sequence."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
        or not 0 < fraction < 1:
      raise ValueError(f"fraction={fraction!r}; allowed: a number in (0, 1)")
    _, first = np.unique(self.sequence_T, return_index=True)
    seqs = self.sequence_T[np.sort(first)]
    if seqs.size < 2:
      raise ValueError(f"the trace holds {seqs.size} sequence(s); a split needs at least 2")
    n_fit = min(max(1, int(round(fraction * seqs.size))), seqs.size - 1)
    fit = np.isin(self.sequence_T, seqs[:n_fit])
    return self.select(fit), self.select(~fit)

  @staticmethod
  def concat(traces: Sequence[Trace]) -> Trace:
    """One trace of several of the same model and layers, in the given order; sequence
    ids are offset so the sequences stay distinct; probs are kept if every trace has them."""
    traces = list(traces)
    if not traces:
      raise ValueError("traces is empty; allowed: one or more traces")
    first = traces[0]
    for i, t in enumerate(traces[1:], 1):
      if t.model != first.model or t.layers != first.layers or t.num_experts != first.num_experts:
        raise ValueError(f"traces[{i}] has model {t.model}, layers {t.layers}; traces[0] has "
                         f"model {first.model}, layers {first.layers}: concat needs one model")
    k = max(t.max_experts for t in traces)

    def pad(a, fill):
      return np.pad(a, ((0, 0), (0, 0), (0, k - a.shape[2])), constant_values=fill)

    offset, seq = 0, []
    for t in traces:
      seq.append(t.sequence_T.astype(np.int64) + offset)
      offset += int(t.sequence_T.max(initial=-1)) + 1
    probs = None
    if all(t.probs_TxNxE is not None for t in traces):
      if len({t.probs_TxNxE.shape[2] for t in traces}) == 1:
        probs = np.concatenate([t.probs_TxNxE for t in traces])
    return Trace(np.concatenate([pad(t.experts_TxNxK, -1) for t in traces]),
                 np.concatenate([pad(t.weights_TxNxK, 0.0) for t in traces]),
                 np.concatenate([t.token_ids_T for t in traces]),
                 np.concatenate([t.positions_T for t in traces]),
                 np.concatenate(seq), list(first.layers), first.num_experts,
                 dict(first.model), probs)

  def dense_weights(self) -> np.ndarray:
    """float32 [T, N, E] combine weight per expert (0: not used)."""
    t, n, _ = self.experts_TxNxK.shape
    w = np.zeros((t, n, self.num_experts), np.float32)
    ti, ni, ki = np.nonzero(self.experts_TxNxK >= 0)
    np.add.at(w, (ti, ni, self.experts_TxNxK[ti, ni, ki]), self.weights_TxNxK[ti, ni, ki])
    return w

  def selected(self) -> np.ndarray:
    """bool [T, N, E]: which experts each token used."""
    t, n, _ = self.experts_TxNxK.shape
    s = np.zeros((t, n, self.num_experts), bool)
    ti, ni, ki = np.nonzero(self.experts_TxNxK >= 0)
    s[ti, ni, self.experts_TxNxK[ti, ni, ki]] = True
    return s


def from_dense(selected_TxNxE: np.ndarray, weights_TxNxE: np.ndarray, **fields) -> Trace:
  """A Trace from dense per-expert arrays: each token's selected experts by descending
  weight (ties: lower index first); `fields` are the other Trace fields."""
  sel = np.asarray(selected_TxNxE, bool)
  if sel.ndim != 3:
    raise ValueError(f"selected_TxNxE has shape {sel.shape}; allowed: 3-D [T, N, E]")
  w = np.where(sel, np.asarray(weights_TxNxE, np.float32), 0.0)
  k = max(1, int(sel.sum(-1).max(initial=0)))
  # Selected experts first (by weight, then index), then the rest.
  key = np.where(sel, -w, np.inf)
  order = np.argsort(key, axis=-1, kind="stable")[..., :k]
  chosen = np.take_along_axis(sel, order, axis=-1)
  return Trace(np.where(chosen, order, -1).astype(np.int32),
               np.where(chosen, np.take_along_axis(w, order, axis=-1), 0.0).astype(np.float32),
               **fields)


def make_trace(experts_TxNxK: np.ndarray, weights_TxNxK: np.ndarray | None = None, *,
               num_experts: int | None = None, sequence_T: np.ndarray | None = None,
               positions_T: np.ndarray | None = None, token_ids_T: np.ndarray | None = None,
               layers: Sequence[int] | None = None, model: dict[str, Any] | None = None,
               probs_TxNxE: np.ndarray | None = None, d_model: int = 64,
               expert_hidden: int = 128) -> Trace:
  """A Trace from hand-built expert ids (tests, examples, synthetic workloads), slots as given.

  Missing weights default to 1/count over each token's experts in a layer;
  sequences to all 0; positions to the order of the tokens within their
  sequence; token ids to 0; layers to 0..N-1; num_experts to the largest id
  + 1; model to a fingerprint of N layers of `d_model`, `expert_hidden`
  bfloat16 experts, top_k = K, router "hand-built".
  """
  ex = _int_array("experts_TxNxK", experts_TxNxK, 3)
  t, n, k = ex.shape
  if weights_TxNxK is None:
    cnt = np.maximum((ex >= 0).sum(-1, keepdims=True), 1)
    weights_TxNxK = np.where(ex >= 0, 1.0 / cnt, 0.0)
  seq = np.zeros(t, np.int32) if sequence_T is None else _int_array("sequence_T", sequence_T, 1)
  if positions_T is None and seq.shape == (t,):
    positions_T = np.zeros(t, np.int32)
    for s in np.unique(seq):
      rows = np.flatnonzero(seq == s)
      positions_T[rows] = np.arange(rows.size)
  e = int(ex.max(initial=-1)) + 1 if num_experts is None else num_experts
  if model is None:
    model = {"num_layers": n, "d_model": d_model, "num_experts": e, "top_k": k,
             "router": "hand-built", "expert_hidden": expert_hidden, "dtype": "bfloat16"}
  return Trace(ex, weights_TxNxK, np.zeros(t, np.int32) if token_ids_T is None else token_ids_T,
               positions_T, seq, list(range(n)) if layers is None else list(layers),
               max(e, 1), model, probs_TxNxE)


def from_routing(routing, model: dict[str, Any] | ml_collections.ConfigDict | None = None
                 ) -> Trace:
  """The unmasked tokens of a `moejax.analysis.routing.Routing` as a Trace.

  Tokens row by row (sequence = row of the B axis, position = index on the L
  axis); K = the most experts a token selects. `model` is the producing
  config or its fingerprint; without it the fingerprint holds only what the
  Routing knows (num_experts, top_k, router), too little for the simulators.
  """
  mask = np.asarray(routing.mask_BxL, bool)
  b, l = mask.shape
  rows_BxL = np.broadcast_to(np.arange(b)[:, None], (b, l))
  pos_BxL = np.broadcast_to(np.arange(l)[None], (b, l))
  probs = routing.probs_NxBxLxC
  fp = (_as_fingerprint(model) if model is not None
        else {"num_experts": int(routing.num_experts), "top_k": int(routing.top_k),
              "router": str(routing.router)})
  return from_dense(
      np.moveaxis(routing.selected_NxBxLxE[:, mask], 0, 1),
      np.moveaxis(routing.weights_NxBxLxE[:, mask], 0, 1),
      token_ids_T=routing.token_ids_BxL[mask], positions_T=pos_BxL[mask],
      sequence_T=rows_BxL[mask], layers=list(routing.layers),
      num_experts=int(routing.num_experts), model=fp,
      probs_TxNxE=None if probs is None else np.moveaxis(probs[:, mask], 0, 1))


def to_routing(trace: Trace, *, top_k: int | None = None):
  """The trace as a `Routing` [N, S, L, E]: S sequences (renumbered 0.. in ascending id),
  padded to the longest position + 1 and masked where no token was traced.

  top_k defaults to the fingerprint's, else K. Domains are not traced (None).
  """
  from moejax.analysis.routing import make_routing  # noqa: PLC0415

  seqs, seq_T = np.unique(trace.sequence_T, return_inverse=True)
  s, l = seqs.size, int(trace.positions_T.max(initial=0)) + 1
  n, e = trace.num_layers, trace.num_experts
  where = (seq_T, trace.positions_T)
  if np.unique(seq_T.astype(np.int64) * l + trace.positions_T).size != trace.num_tokens:
    raise ValueError("trace holds two tokens at the same (sequence, position); a Routing "
                     "needs one token per position")
  sel = np.zeros((n, s, l, e), bool)
  w = np.zeros((n, s, l, e), np.float32)
  ids = np.zeros((s, l), np.int32)
  mask = np.zeros((s, l), bool)
  sel[:, where[0], where[1]] = np.moveaxis(trace.selected(), 1, 0)
  w[:, where[0], where[1]] = np.moveaxis(trace.dense_weights(), 1, 0)
  ids[where] = trace.token_ids_T
  mask[where] = True
  probs = None
  if trace.probs_TxNxE is not None:
    probs = np.zeros((n, s, l, trace.probs_TxNxE.shape[-1]), np.float32)
    probs[:, where[0], where[1]] = np.moveaxis(trace.probs_TxNxE.astype(np.float32), 1, 0)
  k = top_k if top_k is not None else trace.model.get("top_k", trace.max_experts)
  return make_routing(sel, w, token_ids_BxL=ids, mask_BxL=mask, layers=trace.layers,
                      top_k=int(k), router=str(trace.model.get("router", "trace")),
                      probs_NxBxLxC=probs)


def capture(source, data: Any = "val", *, step: int | None = None, **kwargs) -> Trace:
  """The trace of a run (directory, checkpoint directory or `Model`) evaluated on `data`
  ("val", "train", texts or token ids), through `moejax.analysis.routing.capture`
  (whose keyword arguments `kwargs` are: layers, num_batches, domains)."""
  from moejax.analysis import routing as routing_lib  # noqa: PLC0415

  model = (source if isinstance(source, routing_lib.Model)
           else routing_lib.load_model(source, step))
  if why := pool_lib.refusal(model.cfg, "a routing trace (per-layer experts)"):
    raise ValueError(why)
  return from_routing(routing_lib.capture(model, data, **kwargs), fingerprint(model.cfg))


def check_model(trace: Trace, cfg: ml_collections.ConfigDict, arg_name: str) -> None:
  """Raise ValueError naming `arg_name` if the trace's fingerprint differs from `cfg`'s."""
  want = fingerprint(cfg)
  diff = [f"{k}: trace {trace.model.get(k)!r}, model {want[k]!r}" for k in FINGERPRINT_KEYS
          if trace.model.get(k) != want[k]]
  if diff:
    raise ValueError(f"{arg_name}: the trace comes from a different model ({'; '.join(diff)})")


def save(path: str | os.PathLike, trace: Trace) -> None:
  """Write `trace` to one compressed .npz (module docstring)."""
  meta = {"format": FORMAT, "layers": list(map(int, trace.layers)),
          "num_experts": int(trace.num_experts), "model": trace.model}
  arrays = {name: getattr(trace, name) for name in ARRAYS}
  if trace.probs_TxNxE is not None:
    arrays["probs_TxNxE"] = trace.probs_TxNxE.astype(np.float16)
  with open(path, "wb") as f:
    np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), **arrays)


DTYPES = {"experts_TxNxK": np.int32, "weights_TxNxK": np.float32, "token_ids_T": np.int32,
          "positions_T": np.int32, "sequence_T": np.int32, "probs_TxNxE": np.float16}


def load(path: str | os.PathLike) -> Trace:
  """A trace file written by `save`; ValueError naming the file when it is not one."""
  where = f"trace file {os.fspath(path)!r}"
  if not os.path.isfile(path):
    raise ValueError(f"{where} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{where} is not a .npz trace ({e})") from None
  if "meta" not in data:
    raise ValueError(f"{where} has no metadata: not written by moejax.inference.trace.save")
  try:
    meta = json.loads(str(data.pop("meta")))
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: its metadata is not JSON ({e.msg})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    got = meta.get("format") if isinstance(meta, dict) else meta
    raise ValueError(f"{where} has format {got!r}; allowed: {FORMAT!r}")
  missing = [k for k in ("layers", "num_experts", "model") if k not in meta]
  missing += [k for k in ARRAYS if k not in data]
  if missing:
    raise ValueError(f"{where} lacks {missing}")
  for name, a in data.items():
    if name in DTYPES and a.dtype != DTYPES[name]:
      raise ValueError(f"{where}: {name} is {a.dtype}; allowed: {np.dtype(DTYPES[name])}")
  try:
    return Trace(**{k: data[k] for k in ARRAYS}, layers=meta["layers"],
                 num_experts=meta["num_experts"], model=meta["model"],
                 probs_TxNxE=data.get("probs_TxNxE"))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: {e}") from None
