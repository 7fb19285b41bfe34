"""Expert-parallel (EP) dispatch: `jax.shard_map` all-to-all around local experts.

On a mesh with axes ('data', 'fsdp', 'expert') (moejax/parallel/axes.py)
tokens are split over all axes and the E experts over 'expert' (E / ep per
device; each leaf is split on the expert axis its family declares). Inside `jax.shard_map` each device routes its own tokens and
exchanges them with the other devices of its 'expert' group:

- `capacity`: each device fills per-expert buffers of C = ceil(cf * A_loc / E)
  slots from its A_loc local slots (first come first served, as the
  single-device `capacity` dispatcher does on the whole batch), one
  `all_to_all` sends each expert shard its [E/ep, C, D] block, the local
  experts run on [E/ep, ep * C, D], a second `all_to_all` returns the
  results, and they are combined with the slot weights. Slots over capacity
  are dropped and counted (summed over all devices).
- `dropless`: slots are sorted by expert, per-expert counts are exchanged
  (`all_gather` over 'expert'), the rows go to their expert shard with
  `ragged_all_to_all` (offsets from `ragged_offsets`), the local experts run
  on them through their family's ragged path (`ExpertWeights.grouped` with
  `group_offset`), and the reverse exchange brings the rows home. XLA:CPU has no `ragged_all_to_all`;
  there `emulated_ragged_all_to_all` moves the same rows through a padded
  `all_to_all` with a worst-case (A_loc rows per peer) buffer, writing
  exactly what `ragged_all_to_all` writes.

Everything outside the dispatch (router, balancing losses, router-state
statistics) stays in the ordinary jitted program, whose sums over tokens XLA
turns into all-reduces over the token axes, so they are global-batch values.
Sparse routers must use choice-major slots (slot c * T + t belongs to token
t), as every token-choice router does; expert choice does not and keeps the
single-program path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe.dispatch.capacity import capacity_positions, expert_capacity
from moejax.moe.dispatch.dropless import sort_by_expert
from moejax.moe.experts import ExpertWeights, expert_specs
from moejax.moe.types import Assignment
from moejax.parallel.axes import AXES, EXPERT_AXIS, TOKEN_AXES

MODES = ("capacity", "dropless")
RAGGED_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")  # where ragged_all_to_all exists
# Slices on which the TPU compiler refuses ragged_all_to_all ("not supported in
# limited ICI routing settings", libtpu 0.0.42.1): v5e above 16 chips (4x8 and
# larger; 2x8 and 4x4 compile). Device kind -> most chips it compiles for.
RAGGED_MAX_CHIPS = {"TPU v5 lite": 16}


# ----------------------------------------------------------------------------- pure math


def exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def ragged_offsets(sizes_SxS: jax.Array, me: jax.Array | int
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`ragged_all_to_all` arguments of device `me` from the full send-size matrix.

  sizes_SxS[i, j] = rows device i sends to device j; every sender keeps its
  rows grouped by destination (in destination order) and every receiver
  stores what it gets grouped by source (in source order). Returns int32
  [S] arrays (input_offsets, send_sizes, output_offsets, recv_sizes):
  input_offsets[j] = sum_{j' < j} sizes[me, j'], send_sizes[j] = sizes[me, j],
  output_offsets[j] = sum_{i < me} sizes[i, j] (where my chunk lands on j),
  recv_sizes[i] = sizes[i, me]. The reverse exchange is `ragged_offsets(sizes.T, me)`.
  """
  sizes_SxS = jnp.asarray(sizes_SxS, jnp.int32)
  send_S = sizes_SxS[me]
  input_offsets_S = exclusive_cumsum(send_S)
  output_offsets_S = exclusive_cumsum(sizes_SxS, axis=0)[me]
  recv_S = sizes_SxS[:, me]
  return input_offsets_S, send_S, output_offsets_S, recv_S


def received_experts(counts_SxEl: jax.Array, num_rows: int) -> jax.Array:
  """Local expert of each received row; rows past the received total get E_loc.

  The receive buffer holds, source by source, each source's rows grouped by
  local expert: counts_SxEl[i, e] rows from source i for local expert e.
  """
  s, e_loc = counts_SxEl.shape
  ends = jnp.cumsum(counts_SxEl.reshape(-1))
  seg_R = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=ends.dtype), side="right")
  return jnp.where(seg_R < s * e_loc, seg_R % e_loc, e_loc).astype(jnp.int32)


# ----------------------------------------------------------------------------- exchanges


def emulated_ragged_all_to_all(operand: jax.Array, output: jax.Array,
                               input_offsets: jax.Array, send_sizes: jax.Array,
                               output_offsets: jax.Array, recv_sizes: jax.Array, *,
                               axis_name: str, axis_size: int, max_chunk: int) -> jax.Array:
  """`jax.lax.ragged_all_to_all` through a padded `all_to_all` (any platform).

  Each chunk (at most `max_chunk` rows) is copied into a [axis_size, max_chunk,
  ...] send buffer, exchanged with a tiled `all_to_all`, and written at the
  receiver's offsets (`output_offsets` exchanged the same way), so the result
  equals what `ragged_all_to_all` returns.
  """
  r_C = jnp.arange(max_chunk, dtype=jnp.int32)
  src_SxC = input_offsets[:, None] + r_C[None, :]
  live_SxC = r_C[None, :] < send_sizes[:, None]
  rows = jnp.take(operand, jnp.clip(src_SxC, 0, operand.shape[0] - 1), axis=0)
  mask = live_SxC.reshape(live_SxC.shape + (1,) * (operand.ndim - 1))
  buf = jnp.where(mask, rows, jnp.zeros((), operand.dtype))
  if axis_size > 1:
    buf = jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=True)
    where_S = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  else:
    where_S = output_offsets
  ok_SxC = r_C[None, :] < recv_sizes[:, None]
  dst_SxC = jnp.where(ok_SxC, where_S[:, None] + r_C[None, :], output.shape[0])
  return output.at[dst_SxC.reshape(-1)].set(
      buf.reshape((-1,) + operand.shape[1:]), mode="drop")


def _exchange(operand, output, offsets, *, ragged: bool, axis_size: int, max_chunk: int):
  if ragged and axis_size > 1:
    return jax.lax.ragged_all_to_all(operand, output, *offsets, axis_name=EXPERT_AXIS)
  return emulated_ragged_all_to_all(operand, output, *offsets, axis_name=EXPERT_AXIS,
                                    axis_size=axis_size, max_chunk=max_chunk)


# ----------------------------------------------------------------------------- per-device bodies


def _local_assignment(tok_KxT, exp_KxT, wt_KxT, val_KxT, t_loc: int,
                      token_axes: tuple[str, ...]) -> Assignment:
  """This device's slots (choice-major) with token ids local to its shard."""
  base = jax.lax.axis_index(token_axes) * t_loc
  return Assignment(token=(tok_KxT - base).reshape(-1), expert=exp_KxT.reshape(-1),
                    weight=wt_KxT.reshape(-1), valid=val_KxT.reshape(-1))


def _capacity_body(x_TxD, tok, exp, wt, val, w: dict, *, experts: ExpertWeights,
                   num_experts: int, ep: int, capacity_factor: float, token_axes):
  experts = experts.replace(w=w)  # this device's E / ep experts
  dtype = experts.dtype
  t_loc, d = x_TxD.shape
  e, e_loc = num_experts, num_experts // ep
  a = _local_assignment(tok, exp, wt, val, t_loc, token_axes)
  c = expert_capacity(a.num_slots, e, capacity_factor)
  pos_A, keep_A = capacity_positions(a, e, c)
  row_A = jnp.where(keep_A, pos_A, c)  # dropped slots land in row c, sliced off
  x_ExCxD = jnp.zeros((e, c + 1, d), dtype).at[a.expert, row_A].add(
      x_TxD.astype(dtype)[a.token])[:, :c]
  send = x_ExCxD.reshape(ep, e_loc, c, d)
  recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True) if ep > 1 else send
  h_ElxCxD = recv.transpose(1, 0, 2, 3).reshape(e_loc, ep * c, d)
  y_ElxCxD = experts.batched(h_ElxCxD)
  back = y_ElxCxD.reshape(e_loc, ep, c, d).transpose(1, 0, 2, 3)
  back = jax.lax.all_to_all(back, EXPERT_AXIS, 0, 0, tiled=True) if ep > 1 else back
  y_ExCxD = back.reshape(e, c, d)
  w_A = jnp.where(keep_A, a.weight, 0.0).astype(jnp.float32)
  y_AxD = y_ExCxD[a.expert, jnp.minimum(pos_A, c - 1)] * w_A[:, None]
  y_TxD = jnp.zeros((t_loc, d), jnp.float32).at[a.token].add(y_AxD)
  all_axes = tuple(AXES)
  dropped = jax.lax.psum(jnp.sum(a.valid & ~keep_A).astype(jnp.float32), all_axes)
  valid = jax.lax.psum(jnp.sum(a.valid).astype(jnp.float32), all_axes)
  return y_TxD, dropped, valid


def _dropless_body(x_TxD, tok, exp, wt, val, w: dict, *, experts: ExpertWeights,
                   num_experts: int, ep: int, token_axes, backend: str, ragged: bool):
  experts = experts.replace(w=w)  # this device's E / ep experts
  dtype = experts.dtype
  t_loc, d = x_TxD.shape
  e, e_loc = num_experts, num_experts // ep
  a = _local_assignment(tok, exp, wt, val, t_loc, token_axes)
  a_loc = a.num_slots
  order_A, sizes_E = sort_by_expert(a, e)
  tok_A = a.token[order_A]
  wt_A = jnp.where(a.valid, a.weight, 0.0)[order_A].astype(jnp.float32)
  x_AxD = x_TxD.astype(dtype)[tok_A]
  # Every device learns every device's per-expert counts (ep x E int32).
  counts_SxE = (jax.lax.all_gather(sizes_E, EXPERT_AXIS) if ep > 1 else sizes_E[None])
  counts_SxSxEl = counts_SxE.reshape(ep, ep, e_loc)
  sizes_SxS = jnp.sum(counts_SxSxEl, axis=-1)
  me = jax.lax.axis_index(EXPERT_AXIS) if ep > 1 else 0
  rows = ep * a_loc  # worst case: every peer sends all its slots here
  exchange = functools.partial(_exchange, ragged=ragged, axis_size=ep, max_chunk=a_loc)
  recv_RxD = exchange(x_AxD, jnp.zeros((rows, d), dtype), ragged_offsets(sizes_SxS, me))
  mine_SxEl = counts_SxSxEl[:, me, :]
  exp_R = received_experts(mine_SxEl, rows)
  perm_R = jnp.argsort(exp_R, stable=True)
  group_sizes_E = jax.lax.dynamic_update_slice(
      jnp.zeros((e,), jnp.int32), jnp.sum(mine_SxEl, axis=0).astype(jnp.int32),
      (me * e_loc,))
  y_sorted = experts.grouped(recv_RxD[perm_R], group_sizes_E, backend=backend,
                             group_offset=me * e_loc)
  y_RxD = jnp.zeros((rows, d), jnp.float32).at[perm_R].set(y_sorted)
  y_AxD = exchange(y_RxD, jnp.zeros((a_loc, d), jnp.float32), ragged_offsets(sizes_SxS.T, me))
  y_TxD = jnp.zeros((t_loc, d), jnp.float32).at[tok_A].add(y_AxD * wt_A[:, None])
  zero = jnp.zeros((), jnp.float32)
  valid = jax.lax.psum(jnp.sum(a.valid).astype(jnp.float32), tuple(AXES))
  return y_TxD, zero, valid


# ----------------------------------------------------------------------------- entry points


def mesh_sizes(mesh) -> dict[str, int]:
  return {k: int(v) for k, v in dict(mesh.shape).items()}


def ambient_mesh():
  """The mesh set with `jax.set_mesh` if it is a multi-device moejax mesh, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return None
  return mesh if math.prod(mesh_sizes(mesh).values()) > 1 else None


def default_ragged(devices=None) -> bool:
  """Whether the dropless exchange uses `ragged_all_to_all` on `devices` (default: all).

  It exists on TPU and GPU, not on CPU, and the TPU compiler refuses it on
  some slices (`RAGGED_MAX_CHIPS`); elsewhere the padded all-to-all is used.
  """
  devices = jax.devices() if devices is None else list(devices)
  first = devices[0]
  if first.platform not in RAGGED_PLATFORMS:
    return False
  return len(devices) <= RAGGED_MAX_CHIPS.get(first.device_kind, len(devices))


def expert_parallel_dispatch(x_TxD: jax.Array, assignment: Assignment,
                             experts: ExpertWeights, *, cfg, mode: str | None = None, mesh=None,
                             ragged: bool | None = None) -> tuple[jax.Array, dict]:
  """EP dispatch of a choice-major sparse `assignment` on `mesh` (default: ambient).

  Same contract as the single-device dispatchers (y_TxD float32, stats with
  the global `dropped_fraction`); `mode` defaults to `cfg.dispatch`.
  Requires T divisible by the token-axis device count, A a multiple of T and
  E divisible by the expert axis (ValueError naming the value otherwise).
  """
  mode = mode or cfg.dispatch
  if mode not in MODES:
    raise ValueError(f"moe.dispatch={mode!r} has no expert-parallel form; allowed: {MODES}")
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  sizes = mesh_sizes(mesh)
  if not set(AXES) <= set(sizes):
    raise ValueError(f"mesh axes {sorted(sizes)} are not the moejax axes {AXES}")
  ep = sizes[EXPERT_AXIS]
  n_tok = math.prod(sizes[ax] for ax in TOKEN_AXES)
  t, d = x_TxD.shape
  e = experts.num_experts
  if t % n_tok:
    raise ValueError(f"{t} tokens do not split over the {n_tok} devices of the mesh {sizes}")
  if assignment.num_slots % t:
    raise ValueError(f"assignment has {assignment.num_slots} slots, not a multiple of the "
                     f"{t} tokens: expert parallelism needs choice-major token-choice slots")
  if e % ep:
    raise ValueError(f"moe.num_experts={e} is not divisible by the expert axis size {ep}")
  k = assignment.num_slots // t
  slots = [v.reshape(k, t) for v in (assignment.token, assignment.expert,
                                     assignment.weight, assignment.valid)]
  common = dict(experts=experts.replace(w=None), num_experts=e, ep=ep, token_axes=TOKEN_AXES)
  if mode == "capacity":
    body = functools.partial(_capacity_body, capacity_factor=cfg.capacity_factor, **common)
  else:
    backend = cfg.get("gmm_backend", "auto")
    body = functools.partial(_dropless_body, backend=backend,
                             ragged=default_ragged() if ragged is None else ragged, **common)
  tok_spec, slot_spec = P(TOKEN_AXES, None), P(None, TOKEN_AXES)
  w_spec = expert_specs(experts.family, EXPERT_AXIS)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(tok_spec, slot_spec, slot_spec, slot_spec, slot_spec, w_spec),
                     out_specs=(tok_spec, P(), P()),
                     # The gmm kernels' loops carry unannotated zeros; the two
                     # scalar outputs are psums (replicated by construction).
                     check_vma=False)
  y_TxD, dropped, valid = fn(x_TxD, *slots, dict(experts.w))
  return y_TxD, {"dropped_fraction": dropped / jnp.maximum(valid, 1.0)}


def select(cfg, num_tokens: int):
  """The EP dispatcher to use inside the ambient mesh, or None for the usual path.

  Used when a multi-device moejax mesh is set, moe.dispatch is an EP mode
  and the tokens split evenly over the devices (a 1-sequence init does not).
  The MoE layer asks only for routers with choice-major slots
  (`Router.choice_major_slots`).
  """
  mesh = ambient_mesh()
  if mesh is None or cfg.dispatch not in MODES:
    return None
  if num_tokens % math.prod(mesh_sizes(mesh)[ax] for ax in TOKEN_AXES):
    return None
  return functools.partial(expert_parallel_dispatch, mesh=mesh)


__all__ = ["MODES", "ambient_mesh", "emulated_ragged_all_to_all", "expert_parallel_dispatch",
           "ragged_offsets", "received_experts", "select"]
