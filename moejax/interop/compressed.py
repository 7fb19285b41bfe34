"""Exporting compressed runs: merged and quantized experts written as the plain experts HF holds.

A Hugging Face MoE layer has one float SwiGLU expert per router choice. A
merged run (moejax/compress/merge.py: the router scores R experts, mapped by
each layer's "expert_map" onto fewer) is written with R experts, router
expert r holding a copy of the merged expert it maps to; a quantized run
(moe.quant, the packed "quant" collection) is written with its experts
dequantized to float32. Both are exact: the exported model computes what the
moejax run computes. The checkpoint is then as large as an uncompressed one
(HF has no packed-expert format for these families); the compressed run
directory keeps the small form.

`plain_config` is the config the families see; `PlainExperts` wraps a
checkpoint's StoredArrays so that the routed experts read as float params
[N, R, ...], one layer at a time. Dynamic expert skipping (moe.skip_threshold)
has no HF equivalent and is refused.
"""

from __future__ import annotations

from typing import Iterator

import jax
import ml_collections
import numpy as np

from moejax import layout
from moejax.interop.errors import ConversionError
from moejax.moe import layer as moe_layer
from moejax.moe.experts import get_family
from moejax.moe.experts import quantized as q


def is_compressed(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the run's experts are merged (an expert map) or quantized."""
  moe = cfg.moe
  return bool(moe.enabled and (moe_layer.has_expert_map(moe)
                               or q.QuantSpec.from_config(moe) is not None))


def plain_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with R float experts per MoE layer, no expert map and no quantization."""
  moe = cfg.moe
  if moe.get("skip_threshold", 0.0):
    raise ConversionError(f"moe.skip_threshold={moe.skip_threshold} (dynamic expert "
                          "skipping) has no Hugging Face equivalent; export with "
                          "moe.skip_threshold=0")
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe.num_experts = moe_layer.router_experts(moe)
  out.moe.num_router_experts = 0
  if "quant" in out.moe:
    out.moe.quant.scheme = "none"
    for b in q.WIDTHS:
      out.moe.quant[f"experts{b}"] = 0
  return out


class PlainExperts:
  """A StoredArrays view of a compressed run whose routed experts are float32 params.

  `tree`, `read` and `blocks` as StoredArrays'; the "quant" and "expert_map"
  collections are hidden, and params[EXPERTS_PATH][leaf] reads [N, R, ...]
  (`blocks`: one layer per block), dequantized and mapped.
  """

  def __init__(self, arrays, cfg: ml_collections.ConfigDict):
    self.arrays = arrays
    self.spec = q.QuantSpec.from_config(cfg.moe)
    self.leaves = get_family(cfg.moe).leaves()
    self.mapped = moe_layer.has_expert_map(cfg.moe)
    m, moe = cfg.model, cfg.moe
    r = moe_layer.router_experts(moe)
    tree = arrays.tree
    colls = {k: v for k, v in (tree.get("collections") or {}).items()
             if k not in (q.COLLECTION, moe_layer.EXPERT_MAP)}
    n = len(layout.moe_layer_indices(cfg))
    experts = {name: jax.ShapeDtypeStruct((n, *leaf.shape(r, m.d_model, moe.expert_hidden)),
                                          np.float32)
               for name, leaf in self.leaves.items()}
    params = _with(tree["params"], ("params",) + layout.EXPERTS_PATH, experts)
    self.tree = {**tree, "params": params, "collections": colls}
    self._stored = None

  def _expert_leaf(self, where: tuple) -> str | None:
    tail = ("params",) + layout.EXPERTS_PATH
    if len(where) == len(tail) + 1 and tuple(where[:-1]) == tail:
      return where[-1]
    return None

  def _layer(self, name: str, i: int) -> np.ndarray:
    """Layer i's float32 leaf `name` over the router's R experts."""
    leaf = self.leaves[name]
    if self.spec is not None and q.quantizable(leaf):
      base = ("collections", q.COLLECTION) + layout.EXPERTS_PATH
      if self._stored is None:  # the packed codes: a fraction of the float experts' bytes
        self._stored = {"slot": self.arrays.read(base + (q.SLOT,))}
      if name not in self._stored:
        node = self.arrays.metadata(base + (name,))
        self._stored[name] = {c: {part: self.arrays.read(base + (name, c, part))
                                  for part in node[c]} for c in node}
      stored = jax.tree.map(lambda a: a[i], self._stored[name])
      w = np.asarray(q.read_leaf(stored, self._stored["slot"][i], leaf, self.spec))
    else:
      w = np.asarray(self.arrays.read(("params",) + layout.EXPERTS_PATH + (name,))[i])
    if self.mapped:
      map_R = self.arrays.read(("collections", moe_layer.EXPERT_MAP) + layout.MOE_PATH
                               + ("map",))[i]
      w = np.take(w, map_R, axis=leaf.expert_axis)
    return w.astype(np.float32)

  def metadata(self, path: tuple):
    node = self.tree
    for k in path:
      node = node[k]
    return node

  def blocks(self, where: tuple) -> Iterator[tuple[int, np.ndarray]]:
    name = self._expert_leaf(where)
    if name is None:
      yield from self.arrays.blocks(where)
      return
    for i in range(self.tree["params"][layout.MOE_STACK][layout.MOE_BLOCK][layout.MOE][
        layout.EXPERTS][name].shape[0]):
      yield i, self._layer(name, i)[None]

  def read(self, where: tuple) -> np.ndarray:
    if self._expert_leaf(where) is None:
      return self.arrays.read(where)
    return np.concatenate([b for _, b in self.blocks(where)])


def _with(tree: dict, path: tuple, value) -> dict:
  """A copy of nested dict `tree` with tree[path[1:]] = value (path[0] names the root)."""
  out = dict(tree)
  node = out
  for k in path[1:-1]:
    node[k] = dict(node.get(k, {}))
    node = node[k]
  node[path[-1]] = value
  return out
