"""Calibration for post-training compression: what each MoE layer sees and does on real text.

`calibrate(source, data, num_batches=N, max_tokens=S)` runs the model in
evaluation mode over N batches of `train.batch_size` calibration rows with
the flax "intermediates" collection mutable, as
`moejax.analysis.routing.capture` does (the same rows, the same dense
reading of the routing): every `MoELayer` sows its router's decision
("routing") and its input ("moe_input", the normed hidden states entering
the layer). Per MoE layer (the N axis below, in stack order) it keeps

- counts_NxE: tokens routed to each expert (Soft MoE: capture's hard
  reading, the token's top_k experts by combine mass),
- gate_NxE: the summed combine (gate) weights of each expert,
- mean_probs_NxC: the mean router probabilities over the router's C choices
  (null experts included; None for routers without probabilities),
- inputs_NxSxD: the layer inputs at S = min(max_tokens, tokens) tokens drawn
  uniformly without replacement (seeded), the same tokens in every layer, so
  that a method can recompute each expert's output and the layer output
  within a memory budget of S tokens per layer.

Padding (rows that fill the last batch, the masked tail of a text's last
row) is left out of every statistic and never sampled. Batches hold
`train.batch_size` rows as in training, so routers that group tokens across
the batch route as they did there.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import layout
from moejax.analysis import routing as routing_lib
from moejax.train import data as data_lib

SPLITS = routing_lib.SPLITS
DEFAULT_MAX_TOKENS = 4096


@dataclasses.dataclass
class Calibration:
  """Per-layer statistics of N MoE layers over B calibration rows of L tokens (NumPy).

  `input_index_S` is the flat index (row * L + position) into `token_ids_BxL`
  of each sampled token of `inputs_NxSxD`, ascending.
  """

  layers: list[int]  # model layer index of each MoE layer
  router: str
  num_experts: int
  top_k: int
  data: str  # where the rows come from: "val", "train", a file's path, "token ids"
  token_ids_BxL: np.ndarray  # int32
  mask_BxL: np.ndarray  # bool, False on padding
  counts_NxE: np.ndarray  # int64
  gate_NxE: np.ndarray  # float64
  inputs_NxSxD: np.ndarray  # float32
  input_index_S: np.ndarray  # int64
  mean_probs_NxC: np.ndarray | None = None  # float64
  step: int | None = None

  @property
  def sequences(self) -> int:
    return int(self.token_ids_BxL.shape[0])

  @property
  def tokens(self) -> int:
    """Calibration tokens (unmasked)."""
    return int(self.mask_BxL.sum())

  @property
  def sampled_tokens(self) -> int:
    return int(self.input_index_S.size)

  def layer_position(self, layer: int) -> int:
    """Row of model layer `layer` in the N axis."""
    if layer not in self.layers:
      raise ValueError(f"layer={layer!r} is not calibrated; calibrated MoE layers: {self.layers}")
    return self.layers.index(layer)

  def summary(self) -> dict:
    """The JSON-serialisable statistics (all but the rows and the sampled inputs)."""
    per_layer = lambda a: {str(l): a[i].tolist() for i, l in enumerate(self.layers)}  # noqa: E731
    out = {"data": self.data, "sequences": self.sequences,
           "tokens": self.tokens, "sampled_tokens": self.sampled_tokens,
           "layers": list(self.layers), "router": self.router,
           "num_experts": self.num_experts, "top_k": self.top_k, "step": self.step,
           "counts": per_layer(self.counts_NxE), "gate_weight": per_layer(self.gate_NxE)}
    if self.mean_probs_NxC is not None:
      out["mean_probs"] = per_layer(self.mean_probs_NxC)
    return out


def _positive_int(value, name: str, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}; allowed: a positive integer ({what})")
  return int(value)


def evenly_spaced(total: int, n: int) -> np.ndarray:
  """min(n, total) distinct ascending indices evenly spaced over [0, total), ends included.

  Files are in document order: their first rows would all come from the
  first documents.
  """
  return np.linspace(0, total - 1, min(n, total)).round().astype(np.int64)


def calibration_rows(cfg: ml_collections.ConfigDict, data, num_batches: int
                     ) -> tuple[np.ndarray, np.ndarray, str]:
  """(ids_BxL int32, mask_BxL bool, description) of the calibration rows.

  data: "val" / "train": `num_batches * train.batch_size` windows evenly
      spaced over that split of the run's corpus (capture's rows);
      a .jsonl file of {"text"} lines (the run's data.text_field) or a .txt
      file or a directory of them: each document tokenized with the run's
      data.tokenizer and cut into rows of train.seq_len (a document's last
      row padded and masked), of which `num_batches * train.batch_size` rows
      evenly spaced over the file are kept (all when there are fewer);
      an int array [B, L] of token ids: used whole, as given.
  """
  if isinstance(data, (np.ndarray, jax.Array)):
    ids = np.asarray(data)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
      raise ValueError(f"data: token ids must be a non-empty int array [B, L], got "
                       f"{ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg.model.vocab_size:
      raise ValueError(f"data: token ids must lie in [0, {cfg.model.vocab_size}) "
                       "(model.vocab_size)")
    return ids.astype(np.int32), np.ones(ids.shape, bool), "token ids"
  if not isinstance(data, (str, os.PathLike)):
    raise ValueError(f"data is a {type(data).__name__}; allowed: {list(SPLITS)}, a .jsonl/.txt "
                     "path or an int array [B, L] of token ids")
  num_batches = _positive_int(num_batches, "num_batches", "batches of train.batch_size rows")
  data = os.fspath(data)
  if data in SPLITS:
    ids, _, _ = routing_lib._split_rows(cfg, data, num_batches)  # capture's rows
    return ids, np.ones(ids.shape, bool), data
  if not os.path.exists(data):
    raise ValueError(f"data={data!r} is neither a split {list(SPLITS)} nor an existing "
                     ".jsonl/.txt file or directory of them")
  docs = data_lib.load_documents(data, cfg.data.get("text_field", "text"))
  ids, mask, _ = routing_lib.text_windows([d.text for d in docs], cfg.train.seq_len,
                                          cfg.data.get("tokenizer"))
  idx = evenly_spaced(ids.shape[0], num_batches * cfg.train.batch_size)
  return ids[idx], mask[idx], os.path.abspath(data)


@functools.lru_cache(maxsize=16)
def _sown_fn(frozen: ml_collections.FrozenConfigDict):
  """jit(variables, ids_BxL) -> (sown routing, moe_input [N, B*L, D]) of every MoE layer."""
  from moejax import model as lm  # noqa: PLC0415

  model = lm.make_model(frozen, deterministic=True)

  @jax.jit
  def fn(variables, ids_BxL):
    _, inter = model.apply(variables, ids_BxL, mutable=["intermediates"])
    node = layout.get(inter["intermediates"], layout.MOE_PATH, "the sown intermediates")
    return node["routing"][0], node["moe_input"][0].astype(jnp.float32)

  return fn


def calibrate(source, data="val", *, num_batches: int | None = None,
              max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
              step: int | None = None) -> Calibration:
  """Run the model over the calibration rows of `data`; every MoE layer's statistics.

  source: a run directory (its newest checkpoint, or `step`) or an
      `moejax.analysis.Model` (config + variables).
  num_batches: batches of train.batch_size rows (default train.eval_batches;
      token ids are used whole).
  max_tokens: the budget of sampled layer inputs (tokens per layer); `seed`
      draws them.
  """
  model = (source if isinstance(source, routing_lib.Model)
           else routing_lib.load_model(source, step))
  cfg = model.cfg
  layers = routing_lib.moe_layers(cfg)
  if not layers:
    raise ValueError("the model has no MoE layer (moe.enabled is False or no layer is MoE); "
                     "there is nothing to calibrate")
  layout.require_uniform(cfg, "calibration (one stack of alike MoE layers)")
  max_tokens = _positive_int(max_tokens, "max_tokens", "sampled tokens per layer")
  ids, mask, what = calibration_rows(
      cfg, data, cfg.train.eval_batches if num_batches is None else num_batches)
  if not mask.any():
    raise ValueError(f"data={what!r} gives no calibration token")
  rows, l = ids.shape
  flat = np.flatnonzero(mask.reshape(-1))
  index_S = np.sort(np.random.default_rng(seed).choice(
      flat, size=min(max_tokens, flat.size), replace=False))
  batch = cfg.train.batch_size
  pad = (-rows) % batch  # whole batches, padded with masked rows
  ids_p = np.concatenate([ids, np.zeros((pad, l), np.int32)])
  mask_p = np.concatenate([mask, np.zeros((pad, l), bool)])
  fn = _sown_fn(ml_collections.FrozenConfigDict(cfg))
  e, k, n = cfg.moe.num_experts, cfg.moe.top_k, len(layers)
  counts = np.zeros((n, e), np.int64)
  gate = np.zeros((n, e), np.float64)
  probs_sum = None
  inputs = []
  variables = {c: v for c, v in model.variables.items() if c != "intermediates"}
  for start in range(0, ids_p.shape[0], batch):
    m_BxL = mask_p[start:start + batch]
    sown, x_NxTxD = jax.device_get(fn(variables, jnp.asarray(ids_p[start:start + batch])))
    w, sel, probs, _ = routing_lib.dense_routing(sown, batch, l, e, k)
    counts += sel[:, m_BxL].sum(1)
    gate += w[:, m_BxL].astype(np.float64).sum(1)
    if probs is not None:
      part = probs[:, m_BxL].astype(np.float64).sum(1)
      probs_sum = part if probs_sum is None else probs_sum + part
    lo, hi = np.searchsorted(index_S, [start * l, (start + batch) * l])
    inputs.append(np.asarray(x_NxTxD)[:, index_S[lo:hi] - start * l])
  return Calibration(
      layers=layers, router=cfg.moe.router, num_experts=e, top_k=k, data=what,
      token_ids_BxL=ids, mask_BxL=mask, counts_NxE=counts, gate_NxE=gate,
      inputs_NxSxD=np.concatenate(inputs, axis=1).astype(np.float32),
      input_index_S=index_S.astype(np.int64),
      mean_probs_NxC=None if probs_sum is None else probs_sum / float(mask.sum()),
      step=model.step)
