"""The expert-family interface: what an expert is, declared once, applied three ways.

A family declares its parameter leaves (`Leaf`: their dimensions over E =
experts, D = model width, F = expert hidden width and dimensions of the
family's own fixed size (e.g. a latent rank R); their initialisation; which
leaf produces the output; which dimension FSDP may shard) and applies the
experts to

- per-expert buffers x [E, C, D] (`batched`: the dense and capacity
  dispatchers, the soft dispatcher's slots, expert-parallel capacity);
- rows sorted by expert with group sizes (`grouped`: the dropless
  dispatcher and expert-parallel dropless, where the weights hold experts
  [group_offset, group_offset + E_local) of the group sizes);
- tokens through one expert without the E axis (`dense`: shared experts);
- inputs through every expert's input projection (`activation_norms`: the
  norm of the hidden pre-activation that the expert's nonlinearity reads,
  for the ERC loss, moejax/moe/erc.py).

A leaf with the expert axis E holds one slice per expert; a leaf without it
is *shared*: one array per MoE layer that every expert of the layer uses
(e.g. the shared latent projections of moejax/moe/experts/latent.py). Shared
leaves are counted once per layer (`shared_param_count`), replicated over
the mesh's expert axis, kept as they are when experts are gathered (growth,
pruning), and refused where a family must be built per expert (upcycling a
dense FFN, quantized experts, merging).

Everything else reads the declaration and names no weight: the `Experts`
module creates the leaves, dispatchers get `ExpertWeights` (weights bound to
their family and compute dtype), the mesh takes the expert axis and FSDP
dimension of each leaf from it, upcycling maps a dense FFN onto it and
growth gathers experts along its expert axis. A family is a frozen (hashable)
dataclass built from the `moe` config by `from_config`; `check_config`
validates its options.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers import fan_in_init

DIMS = ("E", "D", "F")  # experts, model width, expert hidden width
INITS = ("fan_in", "zeros", "ones")


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One parameter leaf of a family.

  dims: its axes, a tuple over DIMS and the names of `fixed`, each once; "E"
      (the expert axis) at most once: a leaf without it is shared by all
      experts of the layer (`shared`).
  init: "fan_in" (truncated normal, std 1 / sqrt(size of `fan_in`)), "zeros", "ones".
  fan_in: the dim whose size is the fan-in (one of dims for a matrix leaf).
  output: the leaf produces the expert's output: its init std is also
      multiplied by the model's residual-branch scale, and upcycling that
      splits a dense FFN into F-slices multiplies it by the slice count.
  fsdp: the dimension FSDP may shard (over the mesh's 'fsdp' axis, when its
      size divides it), or None.
  fixed: ((name, size), ...) the family's own dims of fixed size (a latent
      rank "R"), not the model's D and F.
  """

  dims: tuple[str, ...]
  init: str = "fan_in"
  fan_in: str = "D"
  output: bool = False
  fsdp: str | None = None
  fixed: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    own = [n for n, _ in self.fixed]
    if set(own) & set(DIMS) or len(set(own)) != len(own) or any(
        not isinstance(n, int) or isinstance(n, bool) or n < 1 for _, n in self.fixed):
      raise ValueError(f"Leaf fixed {self.fixed} must name dims other than {DIMS}, each "
                       "once, with positive integer sizes")
    if len(set(self.dims)) != len(self.dims) or not set(self.dims) <= set(DIMS) | set(own):
      raise ValueError(f"Leaf dims {self.dims} must hold 'E' at most once (once: the expert "
                       f"axis; none: shared by all experts) and only letters of {DIMS} or of "
                       f"fixed {own}, each once")
    if self.init not in INITS:
      raise ValueError(f"Leaf init {self.init!r}; allowed: {INITS}")
    if self.init == "fan_in" and self.fan_in not in (set(DIMS) - {"E"}) | set(own):
      raise ValueError(f"Leaf fan_in {self.fan_in!r} is not D, F or one of fixed {own}")
    if self.fsdp is not None and (self.fsdp not in self.dims or self.fsdp == "E"):
      raise ValueError(f"Leaf fsdp {self.fsdp!r} is not one of its dims {self.dims} "
                       "other than E")

  @property
  def shared(self) -> bool:
    """One array for all experts of the layer (no expert axis)."""
    return "E" not in self.dims

  @property
  def expert_axis(self) -> int:
    if self.shared:
      raise ValueError(f"Leaf dims {self.dims} have no expert axis: the leaf is shared by "
                       "all experts of the layer")
    return self.dims.index("E")

  def sizes(self, d: int, f: int) -> dict[str, int]:
    """{dim: size} of every dim but E."""
    return {"D": d, "F": f, **dict(self.fixed)}

  def shape(self, e: int | None, d: int, f: int) -> tuple[int, ...]:
    """The leaf's shape; e=None drops the expert axis (one expert: shared experts)."""
    size = {"E": e, **self.sizes(d, f)}
    return tuple(size[x] for x in self.dims if not (x == "E" and e is None))

  def initializer(self, d: int, f: int, out_scale: float = 1.0):
    if self.init == "zeros":
      return nn.initializers.zeros
    if self.init == "ones":
      return nn.initializers.ones
    fan = self.sizes(d, f)[self.fan_in]
    return fan_in_init(fan, out_scale if self.output else 1.0)


class ExpertFamily(abc.ABC):
  """Base of the expert families; subclasses are frozen dataclasses (registered by name)."""

  name: ClassVar[str]

  @classmethod
  def from_config(cls, cfg_moe) -> "ExpertFamily":
    """The family with its options from the `moe` config (default: no options)."""
    del cfg_moe
    return cls()

  @classmethod
  def check_config(cls, cfg) -> None:
    """Raises ConfigError for bad `moe.<family>.*` options (default: none to check)."""
    del cfg

  @abc.abstractmethod
  def leaves(self) -> dict[str, Leaf]:
    """{leaf name: Leaf}, in a fixed order."""

  @abc.abstractmethod
  def batched(self, w: dict, x_ExCxD: jax.Array, dtype) -> jax.Array:
    """Expert e applied to its own buffer x[e]: [E, C, D] -> [E, C, D] float32."""

  @abc.abstractmethod
  def grouped(self, w: dict, x_AxD: jax.Array, group_sizes: jax.Array, dtype, *,
              backend: str = "auto", group_offset: Any = None,
              scale_A: jax.Array | None = None) -> jax.Array:
    """Rows sorted by expert: [A, D] -> [A, D] float32.

    Row r belongs to group g(r) by `group_sizes` (length >= E_local, gmm's
    conventions); `w` holds experts [group_offset, group_offset + E_local).
    Rows of other groups and rows past sum(group_sizes) come out zero;
    `scale_A` (optional) multiplies each row's result.
    """

  @abc.abstractmethod
  def activation_norms(self, w: dict, x_NxD: jax.Array, dtype) -> jax.Array:
    """[N, E] float32: the L2 norm over F of input n's hidden pre-activation in expert e.

    The pre-activation is the output of the expert's input projection that
    its nonlinearity reads (SwiGLU: x W_gate; MLP: x W_in + b_in), before the
    nonlinearity; every input goes through every expert.
    """

  def dense(self, w: dict, x_TxD: jax.Array, dtype) -> jax.Array:
    """One expert (leaves without the E axis) on every token: [T, D] -> [T, D] float32."""
    leaves = self.leaves()
    w_E = {k: v if leaves[k].shared else jnp.expand_dims(v, leaves[k].expert_axis)
           for k, v in w.items()}
    return self.batched(w_E, x_TxD[None], dtype)[0]

  def shared_leaves(self) -> dict[str, Leaf]:
    """The leaves without an expert axis (one array per layer for all its experts)."""
    return {k: leaf for k, leaf in self.leaves().items() if leaf.shared}

  def param_count(self, d: int, f: int) -> int:
    """Parameters of one expert of hidden width f (its own leaves, not the shared ones)."""
    return _size([leaf for leaf in self.leaves().values() if not leaf.shared], d, f)

  def shared_param_count(self, d: int, f: int) -> int:
    """Parameters of the shared leaves: once per layer, whatever its number of experts."""
    return _size(list(self.shared_leaves().values()), d, f)


def _size(leaves: list[Leaf], d: int, f: int) -> int:
  """Summed sizes of `leaves` without their expert axis."""
  return sum(math.prod(leaf.shape(None, d, f)) for leaf in leaves)


def expert_specs(family: ExpertFamily, axis: str) -> dict[str, P]:
  """PartitionSpec of each leaf with its expert axis over mesh axis `axis` (shard_map);
  shared leaves are replicated (every expert shard uses all of them)."""
  out = {}
  for name, leaf in family.leaves().items():
    spec = [None] * len(leaf.dims)
    if not leaf.shared:
      spec[leaf.expert_axis] = axis
    out[name] = P(*spec)
  return out


@flax.struct.dataclass
class ExpertWeights:
  """A layer's expert weights bound to their family and compute dtype (what dispatchers get)."""

  w: dict[str, jax.Array]
  family: ExpertFamily = flax.struct.field(pytree_node=False)
  dtype: Any = flax.struct.field(pytree_node=False)

  @property
  def num_experts(self) -> int:
    """The experts these weights hold (E, or E_local inside expert parallelism): the expert
    axis of the first leaf that has one."""
    for name, leaf in self.family.leaves().items():
      if not leaf.shared:
        return int(self.w[name].shape[leaf.expert_axis])
    raise ValueError(f"expert family {self.family.name!r} declares no leaf with an expert "
                     "axis (every leaf is shared): it has no experts")

  def batched(self, x_ExCxD: jax.Array) -> jax.Array:
    return self.family.batched(self.w, x_ExCxD, self.dtype)

  def activation_norms(self, x_NxD: jax.Array) -> jax.Array:
    return self.family.activation_norms(self.w, x_NxD, self.dtype)

  def grouped(self, x_AxD: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
              group_offset: Any = None, scale_A: jax.Array | None = None) -> jax.Array:
    return self.family.grouped(self.w, x_AxD, group_sizes, self.dtype, backend=backend,
                               group_offset=group_offset, scale_A=scale_A)


class Experts(nn.Module):
  """Holds E experts' leaves of `family` (hidden width `hidden`); returns them bound."""

  family: ExpertFamily
  num_experts: int
  hidden: int
  dtype: Any
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, d: int) -> ExpertWeights:
    e, f = self.num_experts, self.hidden
    w = {name: self.param(name, leaf.initializer(d, f, self.out_scale), leaf.shape(e, d, f))
         for name, leaf in self.family.leaves().items()}
    return ExpertWeights(w=w, family=self.family, dtype=self.dtype)


class SharedExperts(nn.Module):
  """Dense experts every token uses (DeepSeekMoE): one expert of `family`, width `hidden`."""

  family: ExpertFamily
  hidden: int
  dtype: Any
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x_TxD: jax.Array) -> jax.Array:
    d, f = x_TxD.shape[-1], self.hidden
    w = {name: self.param(name, leaf.initializer(d, f, self.out_scale), leaf.shape(None, d, f))
         for name, leaf in self.family.leaves().items()}
    return self.family.dense(w, x_TxD, self.dtype)


def row_norms(h_NxExF: jax.Array) -> jax.Array:
  """[N, E] L2 norms over the last axis, float32 (a zero row has norm 0 and gradient 0)."""
  s = jnp.sum(jnp.square(h_NxExF.astype(jnp.float32)), axis=-1)
  return jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)


def group_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[A] int32 group of each row under gmm's conventions (len(group_sizes) past the end)."""
  ends = jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))
  return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right").astype(
      jnp.int32)
