"""Routing traces: which experts each token used in each MoE layer, as one compact file.

A `Trace` stores T tokens x N MoE layers x K slots: the chosen experts (-1
where a slot is empty, K = the most experts any token used) with their
combine weights, plus each token's id, position and sequence, optionally the
router probabilities (float16, for prefetch predictors), and a fingerprint of
the model that produced it, so a simulator can refuse a trace of another
model. Traces come from generation (`tools/generate.py --trace`, tokens in
decoding order) or from evaluation of any run on its validation split or
given texts (`capture`, `tools/capture_trace.py`), and convert to and from
`moejax.analysis.routing.Routing`, so every routing analysis reads them.

File format: one .npz (`save` / `load`) with the arrays under their field
names and the metadata (layers, num_experts, model) as a JSON string.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

FORMAT = "moejax-trace-1"
FINGERPRINT_KEYS = ("num_layers", "d_model", "num_experts", "top_k", "router", "expert_hidden",
                    "dtype")


def fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model facts a trace depends on (and the simulators read: expert sizes)."""
  m, moe = cfg.model, cfg.moe
  return {"num_layers": int(m.num_layers), "d_model": int(m.d_model),
          "num_experts": int(moe.num_experts), "top_k": int(moe.top_k),
          "router": str(moe.router), "expert_hidden": int(moe.expert_hidden or m.ffn_hidden),
          "dtype": str(m.dtype)}


def bytes_per_expert(fp: dict[str, Any] | ml_collections.ConfigDict, dtype_bytes: int = 2
                     ) -> int:
  """Weight bytes of one SwiGLU expert (3 * d_model * expert_hidden parameters)."""
  if not isinstance(fp, dict):
    fp = fingerprint(fp)
  return 3 * int(fp["d_model"]) * int(fp["expert_hidden"]) * int(dtype_bytes)


@dataclasses.dataclass
class Trace:
  """T tokens' routing through N MoE layers (NumPy arrays)."""

  experts_TxNxK: np.ndarray  # int32, -1: empty slot
  weights_TxNxK: np.ndarray  # float32, 0 on empty slots
  token_ids_T: np.ndarray  # int32
  positions_T: np.ndarray  # int32: position in its sequence
  sequence_T: np.ndarray  # int32: which sequence
  layers: list[int]  # model layer index of each of the N MoE layers
  num_experts: int
  model: dict[str, Any]  # fingerprint(cfg)
  probs_TxNxE: np.ndarray | None = None  # float16 router probabilities, if stored

  def __post_init__(self):
    t, n, k = np.shape(self.experts_TxNxK)
    if np.shape(self.weights_TxNxK) != (t, n, k):
      raise ValueError(f"weights_TxNxK has shape {np.shape(self.weights_TxNxK)}; "
                       f"allowed: {(t, n, k)} like experts_TxNxK")
    for name in ("token_ids_T", "positions_T", "sequence_T"):
      if np.shape(getattr(self, name)) != (t,):
        raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}; allowed: ({t},)")
    if len(self.layers) != n:
      raise ValueError(f"layers lists {len(self.layers)} layers; the arrays hold {n}")
    e = self.experts_TxNxK
    if e.size and (e.min() < -1 or e.max() >= self.num_experts):
      raise ValueError(f"experts_TxNxK must lie in [-1, {self.num_experts}); got "
                       f"[{e.min()}, {e.max()}]")
    if self.probs_TxNxE is not None and np.shape(self.probs_TxNxE)[:2] != (t, n):
      raise ValueError(f"probs_TxNxE has shape {np.shape(self.probs_TxNxE)}; allowed: "
                       f"({t}, {n}, choices)")

  @property
  def num_tokens(self) -> int:
    return int(self.experts_TxNxK.shape[0])

  @property
  def num_layers(self) -> int:
    return int(self.experts_TxNxK.shape[1])

  def select(self, rows: np.ndarray) -> Trace:
    """The tokens at `rows` (an index or bool array), in that order."""
    return dataclasses.replace(
        self, experts_TxNxK=self.experts_TxNxK[rows], weights_TxNxK=self.weights_TxNxK[rows],
        token_ids_T=self.token_ids_T[rows], positions_T=self.positions_T[rows],
        sequence_T=self.sequence_T[rows],
        probs_TxNxE=None if self.probs_TxNxE is None else self.probs_TxNxE[rows])

  def split(self, fraction: float) -> tuple[Trace, Trace]:
    """(the first `fraction` of the sequences, the rest): fit on one, evaluate on the other."""
    if not 0 < fraction < 1:
      raise ValueError(f"fraction={fraction!r}; allowed: in (0, 1)")
    seqs = np.unique(self.sequence_T)
    if seqs.size < 2:
      raise ValueError(f"the trace holds {seqs.size} sequence(s); a split needs at least 2")
    cut = seqs[min(max(1, int(round(fraction * seqs.size))), seqs.size - 1)]
    return self.select(self.sequence_T < cut), self.select(self.sequence_T >= cut)

  @staticmethod
  def concat(traces: Sequence[Trace]) -> Trace:
    """One trace of several of the same model; sequence ids are renumbered to stay distinct."""
    if not traces:
      raise ValueError("concat: no trace given")
    first = traces[0]
    for t in traces[1:]:
      if t.model != first.model or t.layers != first.layers:
        raise ValueError("concat: traces of different models or layers")
    k = max(t.experts_TxNxK.shape[2] for t in traces)

    def pad(a, fill):
      return np.pad(a, ((0, 0), (0, 0), (0, k - a.shape[2])), constant_values=fill)

    offs, seq = 0, []
    for t in traces:
      seq.append(t.sequence_T + offs)
      offs += int(t.sequence_T.max(initial=-1)) + 1
    probs = None
    if all(t.probs_TxNxE is not None for t in traces):
      probs = np.concatenate([t.probs_TxNxE for t in traces])
    return Trace(np.concatenate([pad(t.experts_TxNxK, -1) for t in traces]),
                 np.concatenate([pad(t.weights_TxNxK, 0.0) for t in traces]),
                 np.concatenate([t.token_ids_T for t in traces]),
                 np.concatenate([t.positions_T for t in traces]),
                 np.concatenate(seq).astype(np.int32), list(first.layers), first.num_experts,
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
  """A Trace from dense per-expert arrays: each token's experts by descending weight."""
  sel = np.asarray(selected_TxNxE, bool)
  w = np.where(sel, np.asarray(weights_TxNxE, np.float32), 0.0)
  k = max(1, int(sel.sum(-1).max(initial=0)))
  # Selected experts first (by weight, then index), then the rest.
  key = np.where(sel, -w, np.inf)
  order = np.argsort(key, axis=-1, kind="stable")[..., :k]
  chosen = np.take_along_axis(sel, order, axis=-1)
  return Trace(np.where(chosen, order, -1).astype(np.int32),
               np.where(chosen, np.take_along_axis(w, order, axis=-1), 0.0).astype(np.float32),
               **fields)


def from_routing(routing, model: dict[str, Any] | None = None) -> Trace:
  """The unmasked tokens of a `moejax.analysis.routing.Routing` (row by row) as a Trace."""
  mask = routing.mask_BxL
  b, l = mask.shape
  rows_BxL = np.broadcast_to(np.arange(b)[:, None], (b, l))
  pos_BxL = np.broadcast_to(np.arange(l)[None], (b, l))
  probs = routing.probs_NxBxLxC
  fp = dict(model) if model is not None else {"num_experts": routing.num_experts,
                                              "top_k": routing.top_k, "router": routing.router}
  return from_dense(
      np.moveaxis(routing.selected_NxBxLxE[:, mask], 0, 1),
      np.moveaxis(routing.weights_NxBxLxE[:, mask], 0, 1),
      token_ids_T=routing.token_ids_BxL[mask].astype(np.int32),
      positions_T=pos_BxL[mask].astype(np.int32), sequence_T=rows_BxL[mask].astype(np.int32),
      layers=list(routing.layers), num_experts=int(routing.num_experts), model=fp,
      probs_TxNxE=None if probs is None else np.moveaxis(probs[:, mask], 0, 1).astype(
          np.float16))


def to_routing(trace: Trace):
  """The trace as a `Routing` [N, S, L, E] (S sequences padded to the longest, masked)."""
  from moejax.analysis.routing import make_routing  # noqa: PLC0415

  seqs, seq_T = np.unique(trace.sequence_T, return_inverse=True)
  s, l = seqs.size, int(trace.positions_T.max(initial=0)) + 1
  n, e = trace.num_layers, trace.num_experts
  sel = np.zeros((n, s, l, e), bool)
  w = np.zeros((n, s, l, e), np.float32)
  ids = np.zeros((s, l), np.int32)
  mask = np.zeros((s, l), bool)
  sel[:, seq_T, trace.positions_T] = np.moveaxis(trace.selected(), 1, 0)
  w[:, seq_T, trace.positions_T] = np.moveaxis(trace.dense_weights(), 1, 0)
  ids[seq_T, trace.positions_T] = trace.token_ids_T
  mask[seq_T, trace.positions_T] = True
  probs = None
  if trace.probs_TxNxE is not None:
    probs = np.zeros((n, s, l, trace.probs_TxNxE.shape[-1]), np.float32)
    probs[:, seq_T, trace.positions_T] = np.moveaxis(trace.probs_TxNxE.astype(np.float32), 1, 0)
  return make_routing(sel, w, token_ids_BxL=ids, mask_BxL=mask, layers=trace.layers,
                      top_k=trace.model.get("top_k"), router=trace.model.get("router", "trace"),
                      probs_NxBxLxC=probs)


def capture(source, data: Any = "val", **kwargs) -> Trace:
  """The trace of a run (directory, checkpoint or `Model`) evaluated on `data`
  (as `moejax.analysis.routing.capture`: "val", "train", texts or token ids)."""
  from moejax.analysis import routing as routing_lib  # noqa: PLC0415

  model = (source if isinstance(source, routing_lib.Model)
           else routing_lib.load_model(source, kwargs.pop("step", None)))
  r = routing_lib.capture(model, data, **kwargs)
  return from_routing(r, fingerprint(model.cfg))


def check_model(trace: Trace, cfg: ml_collections.ConfigDict, arg: str) -> None:
  """Raise ValueError naming `arg` if the trace was not produced by the model of `cfg`."""
  want = fingerprint(cfg)
  diff = [f"{k}: trace {trace.model.get(k)!r}, model {want[k]!r}" for k in FINGERPRINT_KEYS
          if trace.model.get(k) != want[k]]
  if diff:
    raise ValueError(f"{arg}: the trace comes from a different model ({'; '.join(diff)})")


def save(path: str | os.PathLike, trace: Trace) -> None:
  meta = {"format": FORMAT, "layers": list(map(int, trace.layers)),
          "num_experts": int(trace.num_experts), "model": trace.model}
  arrays = {"experts_TxNxK": trace.experts_TxNxK.astype(np.int32),
            "weights_TxNxK": trace.weights_TxNxK.astype(np.float32),
            "token_ids_T": trace.token_ids_T.astype(np.int32),
            "positions_T": trace.positions_T.astype(np.int32),
            "sequence_T": trace.sequence_T.astype(np.int32)}
  if trace.probs_TxNxE is not None:
    arrays["probs_TxNxE"] = trace.probs_TxNxE.astype(np.float16)
  with open(path, "wb") as f:
    np.savez_compressed(f, meta=np.asarray(json.dumps(meta)), **arrays)


def load(path: str | os.PathLike) -> Trace:
  """A trace file written by `save`; ValueError naming the file when it is not one."""
  where = f"trace file {os.fspath(path)!r}"
  if not os.path.isfile(path):
    raise ValueError(f"{where} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{where} is not a .npz trace ({e})") from None
  if "meta" not in data:
    raise ValueError(f"{where} has no metadata: not written by moejax.inference.trace.save")
  meta = json.loads(str(data.pop("meta")))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{where} has format {meta.get('format')!r}; allowed: {FORMAT!r}")
  need = ("experts_TxNxK", "weights_TxNxK", "token_ids_T", "positions_T", "sequence_T")
  missing = [k for k in need if k not in data]
  if missing:
    raise ValueError(f"{where} lacks arrays {missing}")
  try:
    return Trace(**{k: data[k] for k in need}, layers=meta["layers"],
                 num_experts=meta["num_experts"], model=meta["model"],
                 probs_TxNxE=data.get("probs_TxNxE"))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
