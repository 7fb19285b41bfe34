"""Quantized routed experts: the packed format, its codec, and the module that reads it.

With `moe.quant.scheme` set (tools/compress.py --method quantize makes such
runs), every matrix leaf of the expert family (a `Leaf` with three dims whose
`fan_in` is one of them: its input, contracted dimension K) lives in the
non-trained "quant" collection instead of "params", so the optimizer never
sees integers and fine-tuning a quantized run trains everything else. Other
leaves (biases) stay float parameters.

Bit classes: each MoE layer holds moe.quant.experts8 experts at 8 bits,
experts4 at 4 and experts2 at 2 (the same counts in every layer: the layers
are scanned and need equal shapes); which experts are in which class is per
layer, in the int32 "slot" [E]. A leaf of class b is stored stacked over its
n_b experts in the leaf's own axis order, groups of `group_size` weights
along K:

  codes   uint8, K packed 8 / b codes per byte (low bits first) for b < 8
          (sym / asym), or float8_e4m3fn (fp8: 8 bits only), shape K -> K*b/8;
  scale   float16, one per group (K -> K / group_size);
  zero    float16, asym only: the value code 0 stands for (the group minimum
          rounded down to float16), w ~ code * scale + zero.

  sym:  w ~ (code - 2^(b-1)) * scale, code - 2^(b-1) in [-(2^(b-1)-1), 2^(b-1)-1],
        scale = max|w| / (2^(b-1) - 1);
  asym: scale = (max w - zero) / (2^b - 1);
  fp8:  w ~ float(code) * scale, scale = max|w| / 448 (e4m3's largest value).

Each scale is the smallest float16 with scale * qmax >= the group's range
(qmax = 2^(b-1)-1, 2^b-1 or 448), the asym zero the largest float16 <= the
group minimum, and each code the nearest (ties to even) to w / scale, all
decided by comparisons float32 holds exactly, so the codes do not depend on
how a platform rounds division, cover the group's range, and the integer
schemes keep |w - dequantized w| <= scale / 2 for every weight.

Expert e of a layer is row slot[e] of the concatenation of the classes (8,
then 4, then 2 bits; within a class by ascending expert index). `QuantizedExperts`
dequantizes the whole layer inside the scanned layer (one layer's dense
expert weights exist at a time), gathers them into expert order and returns
ordinary `ExpertWeights` in the compute dtype, so every dispatcher and
family runs unchanged (the ERC loss, moejax/moe/erc.py, measures the same
dequantized weights through the family's `activation_norms`; no gradient
reaches the codes, which are not parameters). A fresh quantized model's experts are its float
initialisation quantized, slot = identity. Expert parallelism, the init
sources that write float experts (init.from_dense, init.grow_from) and
families with leaves shared by all experts (moe.expert="latent") are
refused by config key.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.checks import choice, fail, positive_int
from moejax.moe.experts import get_family
from moejax.moe.experts.base import Experts, ExpertWeights, Leaf

COLLECTION = "quant"
SLOT = "slot"
SCHEMES = ("sym", "asym", "fp8")
WIDTHS = (8, 4, 2)  # the bit classes, in storage order
SCHEME_WIDTHS = {"sym": WIDTHS, "asym": WIDTHS, "fp8": (8,)}
SCALE_DTYPE = jnp.float16
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0


def class_key(bits: int) -> str:
  return f"b{bits}"


def count_key(bits: int) -> str:
  return f"moe.quant.experts{bits}"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a run's experts are stored: scheme, group size, (bits, experts per layer) classes
  in storage order (no empty class)."""

  scheme: str
  group_size: int
  classes: tuple[tuple[int, int], ...]

  @classmethod
  def from_config(cls, cfg_moe) -> "QuantSpec | None":
    """The spec of `moe.quant`; None when the experts are not quantized."""
    q = cfg_moe.get("quant")
    if q is None or q.scheme == "none":
      return None
    return cls(q.scheme, int(q.group_size),
               tuple((b, int(q[f"experts{b}"])) for b in WIDTHS if q[f"experts{b}"] > 0))

  @property
  def num_experts(self) -> int:
    return sum(n for _, n in self.classes)

  def offsets(self) -> list[int]:
    """Position of each class's first expert in the concatenation."""
    return list(np.cumsum([0] + [n for _, n in self.classes])[:-1])


def quantizable(leaf: Leaf) -> bool:
  """A matrix leaf (E and two other dims, one of them its input dim `fan_in`)."""
  return len(leaf.dims) == 3 and leaf.fan_in in leaf.dims


def group_axis(leaf: Leaf) -> int:
  """The leaf's axis of K, the dimension grouped (and packed) along."""
  return leaf.dims.index(leaf.fan_in)


# --------------------------------------------------------------------------- codec


def _grouped(x: jax.Array, axis: int, g: int) -> jax.Array:
  """[..., K, ...] -> [..., K / g, g, ...]."""
  s = x.shape
  return x.reshape(s[:axis] + (s[axis] // g, g) + s[axis + 1:])


def _ungrouped(x: jax.Array, axis: int) -> jax.Array:
  """[..., n, g, ...] -> [..., n * g, ...]."""
  s = x.shape
  return x.reshape(s[:axis] + (s[axis] * s[axis + 1],) + s[axis + 2:])


def _ceil_f16(target: jax.Array, k: int | float) -> jax.Array:
  """The smallest float16 h >= 0 with h * k >= target (float32 target >= 0; inf past
  float16's range). h * k is exact in float32 (k has at most 8 significant bits), so the
  result does not depend on how the platform rounds the division that guesses it."""
  h0 = (target / k).astype(SCALE_DTYPE)
  up = lambda h: jnp.nextafter(h, SCALE_DTYPE(jnp.inf))  # noqa: E731
  cands = [jnp.nextafter(h0, SCALE_DTYPE(-jnp.inf)), h0, up(h0)]
  out = up(cands[-1])
  for c in reversed(cands):
    out = jnp.where((c >= 0) & (c.astype(jnp.float32) * k >= target), c, out)
  return out


def _floor_f16(x: jax.Array) -> jax.Array:
  """The largest float16 <= x."""
  h = x.astype(SCALE_DTYPE)
  return jnp.where(h.astype(jnp.float32) > x, jnp.nextafter(h, SCALE_DTYPE(-jnp.inf)), h)


def _nearest_int(x: jax.Array, s: jax.Array) -> jax.Array:
  """x / s rounded to the nearest integer, ties to even, exactly (s > 0 a float16 value,
  |x / s| <= 256): the guess of the platform's division is corrected by comparing x with
  the midpoints (q +- 1/2) s, which float32 holds exactly."""
  q = jnp.round(x / s)
  odd = jnp.mod(q, 2) == 1
  hi, lo = (q + 0.5) * s, (q - 0.5) * s
  up = (x > hi) | ((x == hi) & odd)
  down = (x < lo) | ((x == lo) & odd)
  return jnp.where(up, q + 1, jnp.where(down, q - 1, q))


def _nearest_fp8(x: jax.Array, s: jax.Array) -> jax.Array:
  """x / s rounded to the nearest float8_e4m3fn, ties to even, exactly (s > 0 a float16
  value, |x / s| <= FP8_MAX): the guess is corrected against the midpoints of its
  neighbours, which float32 holds exactly once multiplied by s."""
  a = jnp.abs(x)
  b = jax.lax.bitcast_convert_type(jnp.minimum(a / s, FP8_MAX).astype(FP8), jnp.uint8)
  top = jax.lax.bitcast_convert_type(jnp.asarray(FP8_MAX, FP8), jnp.uint8)

  def value(bits):
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), FP8).astype(jnp.float32)

  nxt, prv = jnp.minimum(b + 1, top), jnp.where(b > 0, b - 1, 0).astype(jnp.uint8)
  v, vn, vp = value(b), value(nxt), value(prv)
  hi, lo = (v + vn) * 0.5 * s, (vp + v) * 0.5 * s
  up = (b < top) & ((a > hi) | ((a == hi) & (nxt % 2 == 0)))
  down = (b > 0) & ((a < lo) | ((a == lo) & (prv % 2 == 0)))
  bits = jnp.where(up, nxt, jnp.where(down, prv, b)).astype(jnp.uint8)
  bits = jnp.where(x < 0, bits | jnp.uint8(0x80), bits)
  return jax.lax.bitcast_convert_type(bits, FP8)


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
  """uint8 codes < 2^bits -> uint8 with 8 / bits of them per byte along `axis`
  (consecutive codes, the first in the low bits); identity for 8 bits."""
  if bits == 8:
    return codes
  per = 8 // bits
  g = _grouped(codes.astype(jnp.uint32), axis, per)
  shape = [1] * g.ndim
  shape[axis + 1] = per
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape(shape)
  return jnp.sum(g << shifts, axis=axis + 1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, axis: int) -> jax.Array:
  """The inverse of `pack`: uint8 codes, `axis` 8 / bits times longer."""
  if bits == 8:
    return packed
  per = 8 // bits
  p = jnp.expand_dims(packed.astype(jnp.uint32), axis + 1)
  shape = [1] * p.ndim
  shape[axis + 1] = per
  shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape(shape)
  return _ungrouped(((p >> shifts) & (2 ** bits - 1)).astype(jnp.uint8), axis)


def quantize(w: jax.Array, bits: int, scheme: str, group_size: int, axis: int) -> dict:
  """{"codes", "scale"[, "zero"]} of `w` in groups of `group_size` along `axis` (module
  docstring: the schemes); `group_size` must divide w.shape[axis] and be a multiple
  of 8 / bits."""
  if scheme not in SCHEMES:
    raise ValueError(f"scheme={scheme!r}; allowed: {list(SCHEMES)}")
  if bits not in SCHEME_WIDTHS[scheme]:
    raise ValueError(f"bits={bits!r} with scheme={scheme!r}; allowed: "
                     f"{list(SCHEME_WIDTHS[scheme])}")
  g = _grouped(jnp.asarray(w, jnp.float32), axis, group_size)
  red = axis + 1

  def safe(s):
    return jnp.where(s > 0, s, 1.0)

  out = {}
  if scheme == "asym":
    qmax = 2 ** bits - 1
    zero = _floor_f16(jnp.min(g, axis=red, keepdims=True))
    x = g - zero.astype(jnp.float32)
    scale = _ceil_f16(jnp.max(x, axis=red, keepdims=True), qmax)
    codes = jnp.clip(_nearest_int(x, safe(scale.astype(jnp.float32))), 0, qmax)
    codes = codes.astype(jnp.uint8)
    out["zero"] = jnp.squeeze(zero, red)
  elif scheme == "sym":
    qmax = 2 ** (bits - 1) - 1
    scale = _ceil_f16(jnp.max(jnp.abs(g), axis=red, keepdims=True), qmax)
    q = jnp.clip(_nearest_int(g, safe(scale.astype(jnp.float32))), -qmax, qmax)
    codes = (q + 2 ** (bits - 1)).astype(jnp.uint8)
  else:  # fp8
    scale = _ceil_f16(jnp.max(jnp.abs(g), axis=red, keepdims=True), FP8_MAX)
    codes = _nearest_fp8(g, safe(scale.astype(jnp.float32)))
  codes = _ungrouped(codes, axis)
  out["codes"] = codes if scheme == "fp8" else pack(codes, bits, axis)
  out["scale"] = jnp.squeeze(scale, red)
  return out


def dequantize(q: dict, bits: int, scheme: str, group_size: int, axis: int) -> jax.Array:
  """float32 weights of `quantize`'s output."""
  if scheme == "fp8":
    v = q["codes"].astype(jnp.float32)
  else:
    v = unpack(q["codes"], bits, axis).astype(jnp.float32)
    if scheme == "sym":
      v = v - 2 ** (bits - 1)
  w = _grouped(v, axis, group_size) * jnp.expand_dims(q["scale"].astype(jnp.float32), axis + 1)
  if scheme == "asym":
    w = w + jnp.expand_dims(q["zero"].astype(jnp.float32), axis + 1)
  return _ungrouped(w, axis)


# --------------------------------------------------------------------------- one leaf


def slot_map(bits_E: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """int32 slot [E] of a layer whose expert e has bits_E[e] bits (each class's count as
  `spec` says)."""
  bits_E = np.asarray(bits_E)
  order = np.concatenate([np.flatnonzero(bits_E == b) for b, _ in spec.classes])
  counts = [(int(np.sum(bits_E == b)), n) for b, n in spec.classes]
  if order.size != bits_E.size or any(have != n for have, n in counts):
    raise ValueError(f"bits per expert {bits_E.tolist()} do not fill the classes "
                     f"{dict(spec.classes)} (bits: experts per layer)")
  slot = np.empty(bits_E.size, np.int32)
  slot[order] = np.arange(bits_E.size, dtype=np.int32)
  return slot


def expert_bits(slot_E: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """bits [E] of each expert of a layer from its slot map."""
  by_position = np.concatenate([np.full(n, b) for b, n in spec.classes])
  return by_position[np.asarray(slot_E)]


def pack_leaf(w: jax.Array, slot_E: jax.Array, leaf: Leaf, spec: QuantSpec) -> dict:
  """{class key: quantize(...)} of one layer's leaf w (the leaf's dims, E experts) placed
  by slot_E (traceable)."""
  ax, ea = group_axis(leaf), leaf.expert_axis
  expert_at = jnp.argsort(jnp.asarray(slot_E))  # position -> expert
  out = {}
  for (bits, n), start in zip(spec.classes, spec.offsets()):
    part = jnp.take(w, expert_at[start:start + n], axis=ea)
    out[class_key(bits)] = quantize(part, bits, spec.scheme, spec.group_size, ax)
  return out


def read_leaf(stored: dict, slot_E: jax.Array, leaf: Leaf, spec: QuantSpec) -> jax.Array:
  """float32 leaf (E experts in expert order) of `pack_leaf`'s output."""
  ax, ea = group_axis(leaf), leaf.expert_axis
  parts = [dequantize(stored[class_key(b)], b, spec.scheme, spec.group_size, ax)
           for b, _ in spec.classes]
  return jnp.take(jnp.concatenate(parts, axis=ea), slot_E, axis=ea)


# --------------------------------------------------------------------------- the module


class QuantizedExperts(Experts):
  """`Experts` whose matrix leaves are read from the packed "quant" collection."""

  spec: QuantSpec | None = None

  @nn.compact
  def __call__(self, d: int) -> ExpertWeights:
    e, f = self.num_experts, self.hidden
    slot = self.variable(COLLECTION, SLOT, lambda: jnp.arange(e, dtype=jnp.int32)).value
    w = {}
    for name, leaf in self.family.leaves().items():
      init = leaf.initializer(d, f, self.out_scale)
      shape = leaf.shape(e, d, f)
      if not quantizable(leaf):
        w[name] = self.param(name, init, shape)
        continue
      stored = self.variable(COLLECTION, name, lambda init=init, leaf=leaf, shape=shape:
                             pack_leaf(init(self.make_rng("params"), shape),
                                       jnp.arange(e, dtype=jnp.int32), leaf, self.spec))
      w[name] = read_leaf(stored.value, slot, leaf, self.spec).astype(self.dtype)
    return ExpertWeights(w=w, family=self.family, dtype=self.dtype)


def experts_module(cfg_moe):
  """The experts module class `moe.quant` selects (called like `Experts`)."""
  spec = QuantSpec.from_config(cfg_moe)
  if spec is None:
    return Experts
  return functools.partial(QuantizedExperts, spec=spec)


# --------------------------------------------------------------------------- config


def check_config(cfg) -> None:
  """moe.quant.* (ConfigError naming the key)."""
  q = cfg.moe.get("quant")
  if q is None:
    return
  choice(q.scheme, "moe.quant.scheme", ("none",) + SCHEMES)
  positive_int(cfg, "moe.quant.group_size")
  for b in WIDTHS:
    positive_int(cfg, count_key(b), allow_zero=True)
  if q.scheme == "none":
    for b in WIDTHS:
      if q[f"experts{b}"]:
        fail(count_key(b), q[f"experts{b}"], "must be 0 with moe.quant.scheme='none' "
             "(float experts)")
    return
  moe = cfg.moe
  if not moe.enabled:
    fail("moe.quant.scheme", q.scheme, "needs moe.enabled=True (it quantizes routed experts)")
  for b in WIDTHS:
    if b not in SCHEME_WIDTHS[q.scheme] and q[f"experts{b}"]:
      fail(count_key(b), q[f"experts{b}"], f"must be 0 with moe.quant.scheme={q.scheme!r} "
           f"(its widths: {list(SCHEME_WIDTHS[q.scheme])} bits)")
  total = sum(q[f"experts{b}"] for b in WIDTHS)
  if total != moe.num_experts:
    fail("moe.quant.experts8", q.experts8, "moe.quant.experts8 + experts4 + experts2 = "
         f"{total} must equal moe.num_experts={moe.num_experts} (every expert has one width)")
  leaves = get_family(moe).leaves()
  shared = sorted(k for k, leaf in leaves.items() if leaf.shared)
  if shared:
    fail("moe.quant.scheme", q.scheme, f"needs experts of their own: moe.expert={moe.expert!r} "
         f"has leaves {shared} shared by all experts of a layer, which the per-expert bit "
         "classes do not hold; allowed: 'none' with this family")
  sizes = {"D": cfg.model.d_model, "F": moe.expert_hidden}
  mats = {name: leaf for name, leaf in leaves.items() if quantizable(leaf)}
  if not mats:
    fail("moe.quant.scheme", q.scheme, f"moe.expert={moe.expert!r} has no matrix leaf to "
         f"quantize (leaves {sorted(leaves)})")
  g = q.group_size
  for name, leaf in mats.items():
    k = sizes[leaf.fan_in]
    if k % g:
      fail("moe.quant.group_size", g, f"must divide the experts' {name} input dim "
           f"{leaf.fan_in}={k}")
  for b in WIDTHS:
    if q[f"experts{b}"] and q.scheme != "fp8" and g % (8 // b):
      fail("moe.quant.group_size", g, f"must be a multiple of {8 // b} with {b}-bit experts "
           f"({8 // b} codes per byte)")
  if cfg.parallel.expert != 1:
    fail("parallel.expert", cfg.parallel.expert, f"must be 1 with moe.quant.scheme="
         f"{q.scheme!r}: quantized experts do not run expert-parallel")
  init = cfg.get("init")
  for key in ("from_dense", "grow_from"):
    if init is not None and init.get(key, ""):
      fail(f"init.{key}", init[key], f"must be '' with moe.quant.scheme={q.scheme!r}: it "
           "writes float experts; quantize the run it makes instead")


__all__ = ["COLLECTION", "QuantSpec", "QuantizedExperts", "SCHEMES", "WIDTHS", "check_config",
           "dequantize", "experts_module", "pack", "pack_leaf", "quantize", "read_leaf",
           "slot_map", "unpack"]
