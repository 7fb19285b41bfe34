"""The Routing type and its capture: run a trained model, record every MoE layer's routing.

`capture(source, data, layers=...)` runs the model in evaluation mode with
the flax "intermediates" collection mutable; each `MoELayer` sows its
router's decision there (the `Assignment` or `SoftAssignment` it hands to
the dispatcher, plus the router probabilities), so the capture is the
routing the model computes, not a re-implementation of it. The result is a
`Routing` of dense per-token arrays that every analysis in this package
reads.

Per token t and expert e of a captured layer:

- sparse routers (top-k, expert choice, hash, group-limited, recurrent,
  sigmoid-bias): `selected[t, e]` iff a valid assignment slot sends t to e,
  `weights[t, e]` is the combine weight summed over those slots;
- adaptive routers (top_p, relu, null_experts, and expert choice, where a
  token gets 0..E experts): the same, so the number of selected experts
  varies per token; a null-expert pick selects nothing (its probability
  stays in `probs`, which covers the E + num_null choices);
- Soft MoE (`SoftAssignment`): every expert sees every token, so
  `weights[t, e]` is the token's combine mass on expert e (sum of its combine
  weights over e's slots; sums to 1 over e), `dispatch[t, e]` is the token's
  dispatch mass on e (sum over e's slots of the token's share of each slot;
  sums to slots_per_expert over the tokens of a group), and `selected` marks
  the token's `moe.top_k` experts of largest combine mass: a hard reading of
  a dense mixture, so that load, co-activation and specialisation are
  defined for soft routers too.

The routing is the router's decision before any capacity drop of
`moe.dispatch="capacity"` (the layer's `dropped_fraction` metric counts
those). Expert choice and Soft MoE group tokens across the batch at one
position, so their routing of a sequence depends on the other sequences of
its batch: capture runs batches of `train.batch_size` sequences, as in
training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as lm
from moejax import layout
from moejax.moe import pool as pool_lib
from moejax.moe.types import SoftAssignment
from moejax.train import data as data_lib
from moejax.train import tokenizer as tok_lib

SPLITS = ("val", "train")


@dataclasses.dataclass
class Model:
  """A config plus its variables ({"params": ..., other collections}), e.g. a checkpoint."""

  cfg: ml_collections.ConfigDict
  variables: dict
  step: int | None = None


@dataclasses.dataclass
class Routing:
  """Per-token routing of N captured MoE layers over B sequences of L tokens.

  Arrays are NumPy. `mask_BxL` is False on padding (texts that do not fill
  the last window or batch); analyses ignore masked tokens. `domain_B`
  indexes `domain_names` (None when the data has no domains).
  """

  layers: list[int]  # model layer index of each captured MoE layer
  router: str
  num_experts: int
  top_k: int
  token_ids_BxL: np.ndarray  # int32
  mask_BxL: np.ndarray  # bool
  weights_NxBxLxE: np.ndarray  # float32 combine weight per expert (0: not used)
  selected_NxBxLxE: np.ndarray  # bool
  probs_NxBxLxC: np.ndarray | None = None  # float32 router probabilities, C choices
  dispatch_NxBxLxE: np.ndarray | None = None  # float32, Soft MoE only
  domain_B: np.ndarray | None = None  # int32
  domain_names: list[str] = dataclasses.field(default_factory=list)
  step: int | None = None

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def experts_per_token(self) -> np.ndarray:
    """[N, B, L] int32 number of selected experts of each token."""
    return self.selected_NxBxLxE.sum(-1).astype(np.int32)

  def tokens(self, x_NxBxLx: np.ndarray) -> np.ndarray:
    """[N, T, ...]: the unmasked tokens of a per-token array, flattened."""
    return x_NxBxLx[:, self.mask_BxL]

  def layer_position(self, layer: int) -> int:
    """Row of model layer `layer` in the N axis."""
    if layer not in self.layers:
      raise ValueError(f"layer={layer!r} was not captured; captured MoE layers: {self.layers}")
    return self.layers.index(layer)


def moe_layers(cfg: ml_collections.ConfigDict) -> list[int]:
  """Model layer index of each MoE layer, in layer order."""
  return layout.moe_layer_indices(cfg)


def layer_groups(cfg: ml_collections.ConfigDict) -> dict[tuple[int, int], list[int]]:
  """{(experts, top-k): model layers}: the MoE layers a `Routing` can hold together (one
  group unless moe.layer_schedule gives layers different shapes)."""
  out: dict[tuple[int, int], list[int]] = {}
  for layer, shape in zip(moe_layers(cfg), layout.moe_schedule(cfg)):
    out.setdefault(shape, []).append(layer)
  return out


# --------------------------------------------------------------------------- loading


def _as_config(d: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(d)


def checkpoint_steps(run_dir: str) -> list[int]:
  """Steps with a complete checkpoint in `run_dir/checkpoints`, ascending."""
  root = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def load_model(source: str | os.PathLike, step: int | None = None) -> Model:
  """A `Model` from a run directory (newest checkpoint, or `step`) or a step directory.

  `source` is a run dir (holding config.json and checkpoints/) or one of its
  `checkpoints/<step>` directories. Only the saved state is read (orbax,
  no target structure); the optimizer state is discarded.
  """
  import orbax.checkpoint as ocp  # heavy import, only when loading

  path = os.path.abspath(os.fspath(source))
  parent = os.path.dirname(path)
  if (os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit()
      and not os.path.exists(os.path.join(path, "config.json"))):
    if step is not None and step != int(os.path.basename(path)):
      raise ValueError(f"step={step!r} contradicts the checkpoint directory {path}")
    run_dir, step = os.path.dirname(parent), int(os.path.basename(path))
  else:
    run_dir = path
  cfg_path = os.path.join(run_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"source={os.fspath(source)!r} is not a run directory (no config.json) "
                     "nor a <run>/checkpoints/<step> directory")
  with open(cfg_path) as f:
    cfg = _as_config(json.load(f))
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise ValueError(f"source={os.fspath(source)!r}: {run_dir}/checkpoints holds no checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"step={step!r} has no checkpoint in {run_dir}; allowed: {steps}")
  state = ocp.StandardCheckpointer().restore(
      os.path.join(run_dir, "checkpoints", str(step), "state"))
  variables = {"params": state["params"], **dict(state.get("collections") or {})}
  return Model(cfg=cfg, variables=variables, step=int(step))


# --------------------------------------------------------------------------- data


def text_windows(texts: Sequence[str], seq_len: int, tokenizer: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encode texts (by default BOS + UTF-8 bytes + EOS; else the `data.tokenizer`
  rules for one text) and cut each into rows of seq_len.

  Returns (ids_BxL int32, mask_BxL bool, text_B int32: which text each row
  comes from). A text's last row is padded (with EOS, or id 0), masked out.
  """
  tok = tok_lib.get(tokenizer)
  pad_id = tok.eos_id if tok.eos_id is not None else 0
  rows, masks, owner = [], [], []
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}] is a {type(text).__name__}; allowed: str")
    ids = tok.encode_document(text).astype(np.int32)
    for start in range(0, ids.size, seq_len):
      chunk = ids[start:start + seq_len]
      row = np.full(seq_len, pad_id, np.int32)
      row[:chunk.size] = chunk
      rows.append(row)
      masks.append(np.arange(seq_len) < chunk.size)
      owner.append(i)
  if not rows:
    raise ValueError("texts is empty; allowed: a non-empty sequence of strings")
  return np.stack(rows), np.stack(masks), np.asarray(owner, np.int32)


def _split_rows(cfg: ml_collections.ConfigDict, split: str, num_batches: int
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
  data = data_lib.from_config(cfg)
  windows, domains = ((data.val_windows, data.val_domains) if split == "val"
                      else (data.train_windows, data.train_domains))
  n = min(windows.shape[0], num_batches * cfg.train.batch_size)
  # Evenly spaced windows: the split is in corpus order, so its first windows
  # would all come from one or two books.
  idx = np.linspace(0, windows.shape[0] - 1, n).round().astype(np.int64)
  return (windows[idx, :-1].astype(np.int32), domains[idx].astype(np.int32),
          list(data.domains))


# --------------------------------------------------------------------------- capture


@functools.lru_cache(maxsize=16)
def _routing_fn(frozen: ml_collections.FrozenConfigDict):
  model = lm.TransformerLM(frozen, True)

  uniform = layout.is_uniform(frozen)

  @jax.jit
  def fn(variables, ids_BxL):
    _, inter = model.apply(variables, ids_BxL, mutable=["intermediates"])
    if uniform:  # leaves stacked over the MoE layers
      return layout.get(inter["intermediates"], layout.MOE_PATH + ("routing",))[0]
    return [r[0] for r in layout.layer_nodes(frozen, inter["intermediates"], ("routing",),
                                             "the sown routing")]  # one per MoE layer

  return fn


def dense_routing(sown: dict, b: int, l: int, num_experts: int, top_k: int
                  ) -> tuple[np.ndarray, ...]:
  """Sown routing of one batch -> (weights, selected, probs, dispatch) [N, B, L, ...].

  `sown` holds "assignment" (leaves stacked over N layers) and optionally
  "probs_TxE"; see the module docstring for the per-router semantics.
  """
  a = jax.device_get(sown["assignment"])
  t, e = b * l, num_experts
  probs = sown.get("probs_TxE")
  probs = None if probs is None else np.asarray(probs, np.float32).reshape(-1, b, l,
                                                                           np.shape(probs)[-1])
  if isinstance(a, SoftAssignment):
    n, g, m, s = a.combine.shape
    spe = s // e
    tok = np.asarray(a.token).reshape(n, g * m)
    comb = np.asarray(a.combine, np.float32).reshape(n, g * m, e, spe).sum(-1)
    disp = np.asarray(a.dispatch, np.float32).reshape(n, g * m, e, spe).sum(-1)
    w_NxTxE = np.zeros((n, t, e), np.float32)
    d_NxTxE = np.zeros((n, t, e), np.float32)
    for i in range(n):  # each token is in exactly one group
      w_NxTxE[i, tok[i]] = comb[i]
      d_NxTxE[i, tok[i]] = disp[i]
    k = min(top_k, e)
    top_NxTxK = np.argsort(-w_NxTxE, axis=-1, kind="stable")[..., :k]
    sel = np.zeros((n, t, e), bool)
    np.put_along_axis(sel, top_NxTxK, True, axis=-1)
    return (w_NxTxE.reshape(n, b, l, e), sel.reshape(n, b, l, e), probs,
            d_NxTxE.reshape(n, b, l, e))
  tok, exp = np.asarray(a.token), np.asarray(a.expert)
  valid, wt = np.asarray(a.valid, bool), np.asarray(a.weight, np.float32)
  n = tok.shape[0]
  w_NxTxE = np.zeros((n, t, e), np.float32)
  sel = np.zeros((n, t, e), bool)
  for i in range(n):
    v = valid[i]
    np.add.at(w_NxTxE[i], (tok[i][v], exp[i][v]), wt[i][v])
    sel[i, tok[i][v], exp[i][v]] = True
  return w_NxTxE.reshape(n, b, l, e), sel.reshape(n, b, l, e), probs, None


def _resolve_layers(cfg, layers) -> tuple[list[int], list[int], tuple[int, int]]:
  """(model layers, their MoE-layer positions, their (experts, top-k))."""
  all_layers = moe_layers(cfg)
  if not all_layers:
    raise ValueError("the model has no MoE layer (moe.enabled is False or no layer is MoE); "
                     "there is no routing to capture")
  groups = layer_groups(cfg)
  if layers is None:
    if len(groups) > 1:
      raise ValueError(
          f"moe.layer_schedule.kind={cfg.moe.layer_schedule.kind!r} gives the MoE layers "
          "different experts / top-k and a Routing holds layers of one shape; pass layers= "
          "one group of " + ", ".join(f"{ls} ({e} experts, top-k {k})"
                                      for (e, k), ls in groups.items()))
    layers = all_layers
  layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
  bad = [x for x in layers if x not in all_layers]
  if bad or not layers:
    raise ValueError(f"layers={layers!r}: {bad or 'empty'} not MoE layers; "
                     f"allowed: a subset of {all_layers}")
  shapes = {shape for shape, ls in groups.items() for x in layers if x in ls}
  if len(shapes) > 1:
    raise ValueError(f"layers={layers!r} have different (experts, top-k) {sorted(shapes)} "
                     "(moe.layer_schedule); a Routing holds layers of one shape: pass one "
                     "group of " + ", ".join(f"{ls}" for ls in groups.values()))
  return layers, [all_layers.index(x) for x in layers], shapes.pop()


def capture(source: str | os.PathLike | Model, data: Any = "val", *,
            layers: int | Sequence[int] | None = None, num_batches: int | None = None,
            step: int | None = None, domains: Sequence[str] | None = None) -> Routing:
  """Run the model on `data` and return the routing of its MoE layers.

  source: a run directory, a `<run>/checkpoints/<step>` directory (with
      `step` picking a checkpoint of a run dir; newest by default) or a
      `Model` (config + variables, e.g. a live training state).
  data: "val" / "train" (`num_batches` batches, default train.eval_batches,
      of windows evenly spaced over that split of the run's corpus, so that
      all its domains appear; domain = the domain of the window's first
      document, a KJV book for the default corpus), a sequence of texts (each cut into rows
      of train.seq_len; `domains` optionally names each text's domain), or an
      int array [B, L] of token ids.
  layers: model layer indices of the MoE layers to keep (default: all); with a
      layer-wise schedule, layers of one (experts, top-k) (`layer_groups`).
  """
  model = source if isinstance(source, Model) else load_model(source, step)
  cfg = model.cfg
  layer_ids, rows, (num_experts, top_k) = _resolve_layers(cfg, layers)
  # Expert ids are those the layers dispatch to: a cross-layer pool's (moejax/moe/pool.py).
  if pool_lib.enabled(cfg.moe):
    num_experts = pool_lib.dispatched_experts(cfg)[0]
  seq_len, batch = cfg.train.seq_len, cfg.train.batch_size
  domain_B, domain_names = None, []
  if isinstance(data, str):
    kind = "split"
  elif isinstance(data, (np.ndarray, jax.Array)):
    kind = "ids"
  else:
    kind = "texts"
  if domains is not None and kind != "texts":
    raise ValueError(f"domains is given for data of type {type(data).__name__}; "
                     "allowed only with a sequence of texts")
  if kind == "split":
    if data not in SPLITS:
      raise ValueError(f"data={data!r}; allowed: {SPLITS}, a sequence of texts or "
                       "an int array [B, L] of token ids")
    nb = cfg.train.eval_batches if num_batches is None else num_batches
    if isinstance(nb, bool) or not isinstance(nb, (int, np.integer)) or nb < 1:
      raise ValueError(f"num_batches={num_batches!r}; allowed: a positive integer")
    ids, domain_B, domain_names = _split_rows(cfg, data, int(nb))
    mask = np.ones(ids.shape, bool)
  elif kind == "ids":
    ids = np.asarray(data)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"data: token ids must be an int array [B, L], got {ids.dtype} "
                       f"{ids.shape}")
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= cfg.model.vocab_size:
      raise ValueError(f"data: token ids must lie in [0, {cfg.model.vocab_size}) "
                       "(model.vocab_size)")
    ids = ids.astype(np.int32)
    mask = np.ones(ids.shape, bool)
  else:
    texts = list(data)
    ids, mask, owner = text_windows(texts, seq_len, cfg.data.get("tokenizer"))
    if domains is not None:
      if len(domains) != len(texts):
        raise ValueError(f"domains has {len(domains)} entries for {len(texts)} texts; "
                         "allowed: one domain name per text")
      domain_names = sorted(set(domains))
      lookup = {name: j for j, name in enumerate(domain_names)}
      domain_B = np.asarray([lookup[domains[i]] for i in owner], np.int32)
  # Whole batches of train.batch_size rows, padded with masked EOS rows.
  n_rows = ids.shape[0]
  pad = (-n_rows) % batch
  real_B = np.ones(n_rows, bool)
  if pad:
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, ids.shape[1]), bool)])
    real_B = np.concatenate([real_B, np.zeros(pad, bool)])
  fn = _routing_fn(ml_collections.FrozenConfigDict(cfg))
  parts = []
  for start in range(0, ids.shape[0], batch):
    sown = jax.device_get(fn(model.variables, jnp.asarray(ids[start:start + batch])))
    if isinstance(sown, list):  # one per MoE layer (a layer-wise schedule)
      sown = jax.tree.map(lambda *xs: np.stack(xs), *[sown[r] for r in rows])
    else:
      sown = jax.tree.map(lambda x: np.asarray(x)[rows], sown)
    parts.append(dense_routing(sown, batch, ids.shape[1], num_experts, top_k))
  cat = lambda i: (None if parts[0][i] is None  # noqa: E731
                   else np.concatenate([p[i] for p in parts], axis=1)[:, real_B])
  return Routing(layers=layer_ids, router=cfg.moe.router, num_experts=num_experts,
                 top_k=top_k, token_ids_BxL=ids[real_B], mask_BxL=mask[real_B],
                 weights_NxBxLxE=cat(0), selected_NxBxLxE=cat(1), probs_NxBxLxC=cat(2),
                 dispatch_NxBxLxE=cat(3), domain_B=domain_B, domain_names=domain_names,
                 step=model.step)


def make_routing(selected_NxBxLxE: np.ndarray, weights_NxBxLxE: np.ndarray | None = None, *,
                 token_ids_BxL: np.ndarray | None = None, mask_BxL: np.ndarray | None = None,
                 domain_B: np.ndarray | None = None, domain_names: Sequence[str] = (),
                 layers: Sequence[int] | None = None, top_k: int | None = None,
                 router: str = "hand-built", probs_NxBxLxC: np.ndarray | None = None
                 ) -> Routing:
  """A `Routing` from arrays (hand-built routings for tests and examples).

  Missing weights default to 1/count over each token's selected experts;
  missing token ids to 0, the mask to all True, layers to 0..N-1, top_k to
  the largest number of experts any token selects.
  """
  sel = np.asarray(selected_NxBxLxE, bool)
  if sel.ndim != 4:
    raise ValueError(f"selected_NxBxLxE must be 4-D [N, B, L, E], got shape {sel.shape}")
  n, b, l, e = sel.shape
  if weights_NxBxLxE is None:
    cnt = np.maximum(sel.sum(-1, keepdims=True), 1)
    weights_NxBxLxE = sel / cnt
  w = np.asarray(weights_NxBxLxE, np.float32)
  if w.shape != sel.shape:
    raise ValueError(f"weights_NxBxLxE has shape {w.shape}; allowed: {sel.shape} like selected")
  ids = np.zeros((b, l), np.int32) if token_ids_BxL is None else np.asarray(token_ids_BxL, np.int32)
  mask = np.ones((b, l), bool) if mask_BxL is None else np.asarray(mask_BxL, bool)
  for name, arr in (("token_ids_BxL", ids), ("mask_BxL", mask)):
    if arr.shape != (b, l):
      raise ValueError(f"{name} has shape {arr.shape}; allowed: {(b, l)}")
  if domain_B is not None:
    domain_B = np.asarray(domain_B, np.int32)
    if domain_B.shape != (b,) or (len(domain_names) and domain_B.max() >= len(domain_names)):
      raise ValueError(f"domain_B has shape {domain_B.shape} / max {domain_B.max()}; allowed: "
                       f"[{b}] indices into domain_names ({len(domain_names)} names)")
    if not len(domain_names):
      domain_names = [str(i) for i in range(int(domain_B.max()) + 1)]
  k = int(sel.sum(-1).max(initial=0)) if top_k is None else top_k
  return Routing(layers=list(range(n)) if layers is None else list(layers), router=router,
                 num_experts=e, top_k=max(k, 1), token_ids_BxL=ids, mask_BxL=mask,
                 weights_NxBxLxE=w, selected_NxBxLxE=sel, probs_NxBxLxC=probs_NxBxLxC,
                 domain_B=domain_B, domain_names=list(domain_names))
