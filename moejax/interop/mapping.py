"""Hugging Face tensors <-> the moejax parameter tree, from a list of pure `Group` mappings.

A `Group` maps one or more HF tensors (e.g. the E experts' w1, or q/k/v) to
one moejax leaf of one layer (or a top-level leaf), with the transform both
ways. `from_hf` places each layer's slice in its scanned stack
(moejax/layout.py: `layer_location`), checks every HF tensor's shape against
the shape the moejax leaf implies, and refuses missing and unexpected
tensors; `to_hf` walks the same groups backwards. Both require every moejax
leaf to be covered, so a leaf no family maps is an error, never dropped.
`read_plan` / `read_piece` and `export_plan` / `export_piece` are the same
walks one leaf slice at a time, for the streamed conversion
(moejax/interop/streaming.py); `from_hf` / `to_hf` hold the whole tree.

HF Linear weights are [out, in]; moejax matrices are [in, out...].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import layout
from moejax.interop.errors import ConversionError

Arrays = list


@dataclasses.dataclass(frozen=True)
class Group:
  """HF tensors `hf` <-> the moejax leaf `path` (inside layer `layer`'s block, or top-level)."""

  hf: tuple[str, ...]
  path: tuple[str, ...]
  to_moejax: Callable[[Arrays], np.ndarray]
  to_hf: Callable[[np.ndarray], Arrays]
  layer: int | None = None
  collection: str = "params"


def identity(hf: str, path, layer=None, collection="params") -> Group:
  """Same shape both sides (norm gains, embeddings, biases of the right shape)."""
  return Group((hf,), tuple(path), lambda ws: ws[0], lambda x: [x], layer, collection)


def linear(hf: str, path, layer, out_shape: tuple[int, ...]) -> Group:
  """W [prod(out_shape), in] <-> w [in, *out_shape]."""
  return Group((hf,), tuple(path),
               lambda ws: ws[0].T.reshape((ws[0].shape[1],) + tuple(out_shape)),
               lambda x: [x.reshape(x.shape[0], -1).T], layer)


def out_proj(hf: str, path, layer, in_shape: tuple[int, ...]) -> Group:
  """W [D, prod(in_shape)] <-> w [*in_shape, D] (attention output projections)."""
  n = math.prod(in_shape)
  return Group((hf,), tuple(path), lambda ws: ws[0].T.reshape(tuple(in_shape) + (-1,)),
               lambda x: [x.reshape(n, -1).T], layer)


def fused(hfs: tuple[str, ...], path, layer, each: tuple[int, ...]) -> Group:
  """Linear weights W_i [prod(each), D] <-> w [D, n, *each] (q/k/v, k/v)."""
  return Group(tuple(hfs), tuple(path),
               lambda ws: np.stack([w.T.reshape((w.shape[1],) + tuple(each)) for w in ws], 1),
               lambda x: [x[:, i].reshape(x.shape[0], -1).T for i in range(len(hfs))], layer)


def fused_bias(hfs: tuple[str, ...], path, layer, each: tuple[int, ...]) -> Group:
  """Biases b_i [prod(each)] <-> b [n, *each]."""
  return Group(tuple(hfs), tuple(path),
               lambda ws: np.stack([w.reshape(each) for w in ws]),
               lambda x: [x[i].reshape(-1) for i in range(len(hfs))], layer)


def reshaped(hf: str, path, layer, shape: tuple[int, ...]) -> Group:
  """A vector [prod(shape)] <-> [*shape] (a bias over heads)."""
  return Group((hf,), tuple(path), lambda ws: ws[0].reshape(shape), lambda x: [x.reshape(-1)],
               layer)


def experts(hfs: tuple[str, ...], path, layer) -> Group:
  """E per-expert Linear weights W_e [out, in] <-> one stacked leaf w [E, in, out]."""
  return Group(tuple(hfs), tuple(path), lambda ws: np.stack([w.T for w in ws]),
               lambda x: [x[e].T for e in range(len(hfs))], layer)


def permuted(g: Group, perm: np.ndarray) -> Group:
  """`g` with the last axis of the moejax leaf permuted: moejax[..., j] = hf-side[..., perm[j]]."""
  inv = np.argsort(perm)
  return dataclasses.replace(g, to_moejax=lambda ws: g.to_moejax(ws)[..., perm],
                             to_hf=lambda x: g.to_hf(x[..., inv]))


def _location(cfg, g: Group) -> tuple[tuple[str, ...], int | None]:
  """(full path in the collection, index along the scan axis or None)."""
  if g.layer is None:
    return g.path, None
  stack, block, idx = layout.layer_location(cfg, g.layer)
  return (stack, block) + g.path, idx


def _leaves(tree: dict, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def abstract_variables(cfg: ml_collections.ConfigDict) -> dict:
  """Shapes of every variable of `cfg`'s model ({collection: tree of ShapeDtypeStruct})."""
  from moejax import model as lm  # noqa: PLC0415

  out = jax.eval_shape(lambda: lm.init(jax.random.key(0), cfg))
  return jax.tree.map(lambda x: x, dict(out))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _coverage(cfg, groups: list[Group], abstract: dict) -> None:
  """Every (leaf, layer slice) of the model is mapped exactly once."""
  seen: dict[tuple, str] = {}
  for g in groups:
    path, idx = _location(cfg, g)
    key = (g.collection, path, idx)
    if key in seen:
      raise ConversionError(f"internal: moejax leaf {g.collection}/{'/'.join(path)}[{idx}] is "
                            f"mapped twice ({seen[key]} and {g.hf[0]})")
    seen[key] = g.hf[0]
  for coll, tree in abstract.items():
    for path, leaf in _leaves(tree):
      stacked = path[0] in (layout.DENSE_STACK, layout.MOE_STACK)
      for idx in (range(leaf.shape[0]) if stacked else [None]):
        if (coll, path, idx) not in seen:
          raise ConversionError(f"moejax variable {coll}/{'/'.join(path)}"
                                + (f"[layer slice {idx}]" if stacked else "")
                                + " has no Hugging Face tensor in this family's mapping")


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One moejax leaf and the groups that fill it: `groups[i]` is layer slice i of a stacked
  leaf (leading scan axis), `groups[0]` the whole of an unstacked one."""

  collection: str
  path: tuple[str, ...]
  shape: tuple[int, ...]
  groups: tuple[Group, ...]
  stacked: bool

  @property
  def piece_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape


Leaves = dict  # {(collection, path): Leaf}, in the model's leaf order


def _plan(cfg, groups: list[Group], abstract: dict) -> Leaves:
  """Every leaf of `abstract` with its groups (each slice mapped exactly once)."""
  _coverage(cfg, groups, abstract)
  slots: dict[tuple, dict] = {}
  for g in groups:
    path, idx = _location(cfg, g)
    if g.collection not in abstract or not layout.has(abstract[g.collection], path):
      raise ConversionError(f"internal: {g.hf[0]} maps to {g.collection}/{'/'.join(path)}, "
                            "which this model does not have")
    slots.setdefault((g.collection, path), {})[idx] = g
  out: Leaves = {}
  for coll, tree in abstract.items():
    for path, leaf in _leaves(tree):
      shape = tuple(leaf.shape)
      stacked = path[0] in (layout.DENSE_STACK, layout.MOE_STACK)
      mine = slots[(coll, path)]
      out[(coll, path)] = Leaf(coll, path, shape,
                               tuple(mine[i] for i in range(shape[0])) if stacked
                               else (mine[None],), stacked)
  return out


def _leaf_of(cfg, leaves: Leaves, g: Group) -> Leaf:
  return leaves[(g.collection, _location(cfg, g)[0])]


def _hf_shapes(g: Group, piece_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  """Shapes of the HF tensors of `g` for a moejax slice of `piece_shape`."""
  return [tuple(s.shape) for s in
          jax.eval_shape(g.to_hf, jax.ShapeDtypeStruct(piece_shape, jnp.float32))]


def read_plan(cfg: ml_collections.ConfigDict, groups: list[Group], reader) -> Leaves:
  """The leaves `from_hf` fills from `reader` (names(), shape()), after checking that it holds
  exactly the tensors the groups name, each of the shape its leaf implies (reads no data)."""
  leaves = _plan(cfg, groups, abstract_variables(cfg))
  have = set(reader.names())
  wanted = {n for g in groups for n in g.hf}
  missing = sorted(wanted - have)
  if missing:
    raise ConversionError(f"missing tensors ({len(missing)}): {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} (the config.json implies them)")
  extra = sorted(have - wanted)
  if extra:
    raise ConversionError(f"unexpected tensors ({len(extra)}) the config.json does not explain: "
                          f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
  for g in groups:
    leaf = _leaf_of(cfg, leaves, g)
    for name, w in zip(g.hf, _hf_shapes(g, leaf.piece_shape)):
      got = reader.shape(name)
      if got != w:
        raise ConversionError(f"tensor {name!r} has shape {list(got)}; the config.json implies "
                              f"{list(w)} (for moejax {g.collection}/{'/'.join(leaf.path)})")
  return leaves


def read_piece(leaf: Leaf, i: int, reader) -> np.ndarray:
  """Layer slice i of a stacked `leaf` (the whole leaf when unstacked), float32, read now."""
  g = leaf.groups[i]
  value = np.asarray(g.to_moejax([reader.get(n) for n in g.hf]), np.float32)
  assert value.shape == leaf.piece_shape, (g, value.shape, leaf.piece_shape)
  return value


def from_hf(cfg: ml_collections.ConfigDict, groups: list[Group], reader) -> dict:
  """{collection: tree of float32 arrays} read through `reader` (names(), shape(), get()),
  all in memory (`moejax.interop.streaming` writes a run leaf by leaf instead)."""
  out: dict[str, dict] = {}
  for (coll, path), leaf in read_plan(cfg, groups, reader).items():
    if leaf.stacked:
      value = np.zeros(leaf.shape, np.float32)
      for i in range(leaf.shape[0]):
        value[i] = read_piece(leaf, i, reader)
    else:
      value = read_piece(leaf, 0, reader)
    _set(out.setdefault(coll, {}), path, value)
  return out


EXPORTED = ("params", "moe_state")  # the collections a Hugging Face checkpoint holds


def export_plan(cfg: ml_collections.ConfigDict, groups: list[Group], shapes: dict
                ) -> tuple[Leaves, list[tuple[str, tuple[int, ...]]]]:
  """(the leaves `to_hf` reads, (HF name, shape) of every tensor it writes in `groups` order)
  for variables of `shapes` ({collection: tree of objects with .shape}; only params and
  moe_state are read)."""
  abstract = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), jnp.float32), v)
              for k, v in shapes.items() if k in EXPORTED}
  leaves = _plan(cfg, groups, abstract)
  tensors = []
  for g in groups:
    tensors += list(zip(g.hf, _hf_shapes(g, _leaf_of(cfg, leaves, g).piece_shape)))
  return leaves, tensors


def export_piece(leaf: Leaf, i: int, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 C-contiguous array) of layer slice i (or the whole unstacked leaf)."""
  g = leaf.groups[i]
  for name, x in zip(g.hf, g.to_hf(np.asarray(value, np.float32))):
    yield name, np.ascontiguousarray(np.asarray(x, np.float32))


def to_hf(cfg: ml_collections.ConfigDict, groups: list[Group], variables: dict
          ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array) pairs of in-memory `variables`, in `groups` order."""
  leaves, _ = export_plan(cfg, groups, variables)
  for g in groups:
    path, idx = _location(cfg, g)
    leaf = leaves[(g.collection, path)]
    value = np.asarray(layout.get(variables[g.collection], path, g.collection), np.float32)
    yield from export_piece(leaf, 0 if idx is None else idx,
                            value if idx is None else value[idx])
