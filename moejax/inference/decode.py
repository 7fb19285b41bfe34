"""Autoregressive decoding with a key/value cache: prefill, then one token per step.

A `Decoder` holds a run's config and variables. `generate` left-pads a batch
of prompts of different lengths to one power-of-two width P (one compilation
per width class), runs the prompt through the model once (prefill, writing
the cache), then decodes up to N new tokens in one jit-compiled
`lax.while_loop` over a fixed cache of M = P + N slots: nothing recompiles
per token, and the loop stops early once every sequence has emitted a stop
token. Padding slots are masked out of attention and RoPE positions count
from each prompt's first real token, so a prompt decodes the same alone or
in a batch. Sampling keys are per prompt (`fold_in(seed, prompt index)`),
so sampled continuations do not depend on the batching either.

Only models whose routing of a token depends on that token alone can decode
this way (the router contract's `decode_refusal`): expert choice and Soft
MoE mix tokens across the batch, and `moe.dispatch="capacity"` drops
assignments depending on the other tokens of a batch; these are refused
with the reason instead of decoding with routing unlike training's.

With `trace=True` the routing of every generated token in every MoE layer
(the combine weight per expert, as the MoE layer sows it for
moejax/analysis) comes back as a `moejax.inference.trace.Trace` (over
moe.num_experts experts per layer: with a layer-wise schedule, the widest).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import layout
from moejax.eval.nll import pad_len
from moejax.inference.sampling import Sampling, sample
from moejax.model.transformer import TransformerLM
from moejax.moe.routers import get_router



def decode_refusal(cfg: ml_collections.ConfigDict) -> str | None:
  """None if the model of `cfg` can decode one token at a time as it was trained; else why."""
  n_dense, n_periods = layout.layer_plan(cfg)
  del n_dense
  if not n_periods:
    return None
  why = get_router(cfg.moe.router).decode_refusal(cfg)
  if why is not None:
    return f"moe.router={cfg.moe.router!r} cannot decode: {why}"
  if cfg.moe.dispatch == "capacity":
    return ("moe.dispatch='capacity' cannot decode: which assignments it drops depends on the "
            "other tokens of a batch, so one token at a time would be routed unlike training; "
            "decode with moe.dispatch='dropless' (tools/generate.py --dispatch dropless), which "
            "computes the same routing without drops")
  return None


def max_context(cfg: ml_collections.ConfigDict, run_dir: str | None = None) -> int:
  """Longest prompt + continuation: a converted checkpoint's max_position_embeddings, else
  the run's train.seq_len (the longest context the model was trained on)."""
  if run_dir is not None:
    path = os.path.join(run_dir, "hf_config.json")
    if os.path.exists(path):
      with open(path) as f:
        n = json.load(f).get("max_position_embeddings")
      if isinstance(n, int) and n > 0:
        return n
  return int(cfg.train.seq_len)


@dataclasses.dataclass(frozen=True)
class Generation:
  """One prompt's continuation: `tokens` are the generated ids only (a stop token that
  ended it included)."""

  prompt_tokens: np.ndarray  # int32 [P]
  tokens: np.ndarray  # int32 [n]
  stopped: bool  # ended on a stop token (else on max_new_tokens)


class Decoder:
  """Cached decoding of a run's model (`cfg`, `variables` = {"params", collections...})."""

  def __init__(self, cfg: ml_collections.ConfigDict, variables: dict, *,
               context: int | None = None):
    why = decode_refusal(cfg)
    if why is not None:
      raise ValueError(why)
    self.cfg = ml_collections.FrozenConfigDict(cfg)
    self.variables = {k: v for k, v in variables.items() if k != "cache"}
    self.context = int(context or cfg.train.seq_len)
    n_dense, n_periods = layout.layer_plan(cfg)
    self.num_moe_layers = n_periods
    self.num_experts = int(cfg.moe.num_experts) if n_periods else 0

  # ------------------------------------------------------------------ pieces

  def prefill(self, ids_BxP: np.ndarray, pad_B: np.ndarray, cache_len: int
              ) -> tuple[jax.Array, dict]:
    """Logits [B, P, V] of left-padded prompts and the cache after them."""
    return _prefill_fn(self.cfg, cache_len)(self.variables, jnp.asarray(ids_BxP, jnp.int32),
                                            jnp.asarray(pad_B, jnp.int32))

  def step(self, cache: dict, tokens_B: np.ndarray, positions_B: np.ndarray, index: int
           ) -> tuple[jax.Array, dict]:
    """Logits [B, V] of one new token per sequence at cache slot `index`, the new cache."""
    cache_len = cache["valid"].shape[1]
    logits, cache, _ = _step_fn(self.cfg, cache_len, False)(
        self.variables, cache, jnp.asarray(tokens_B, jnp.int32)[:, None],
        jnp.asarray(positions_B, jnp.int32)[:, None], jnp.asarray(index, jnp.int32))
    return logits[:, 0], cache

  # ------------------------------------------------------------------ generate

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0,
               stop_tokens: Sequence[int] = (), batch_size: int = 8, trace: bool = False
               ) -> tuple[list[Generation], np.ndarray | None]:
    """Continuations of every prompt (in order), and with `trace` the routing of each
    generated token: float32 [sum of generated lengths, num MoE layers, E] combine
    weights (rows in prompt order, then token order)."""
    prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    self._check(prompts, max_new_tokens, stop_tokens, batch_size)
    v = self.cfg.model.vocab_size
    stop = np.asarray(sorted(set(int(t) for t in stop_tokens)) or [-1], np.int32)
    out: list[Generation] = []
    routes: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
      chunk = prompts[start:start + batch_size]
      p = pad_len(max(x.size for x in chunk))
      b = len(chunk) if len(prompts) <= batch_size else batch_size
      ids_BxP = np.zeros((b, p), np.int32)
      pad_B = np.full(b, p - 1, np.int32)  # unused rows: one dummy token
      for i, x in enumerate(chunk):
        ids_BxP[i, p - x.size:] = x
        pad_B[i] = p - x.size
      keys_B = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
          jnp.arange(start, start + b))
      fn = _generate_fn(self.cfg, p, max_new_tokens, sampling, trace)
      toks_BxN, n_B, stopped_B, route = jax.device_get(
          fn(self.variables, jnp.asarray(ids_BxP), jnp.asarray(pad_B), keys_B,
             jnp.asarray(stop)))
      for i, x in enumerate(chunk):
        n = int(n_B[i])
        out.append(Generation(x.astype(np.int32), toks_BxN[i, :n].astype(np.int32),
                              bool(stopped_B[i])))
        if trace:
          routes.append(np.asarray(route[:n, :, i], np.float32))
      assert toks_BxN.max(initial=0) < v
    trace_out = None
    if trace:
      trace_out = (np.concatenate(routes) if routes
                   else np.zeros((0, self.num_moe_layers, self.num_experts), np.float32))
    return out, trace_out

  def _check(self, prompts: list[np.ndarray], max_new: int, stop_tokens, batch_size) -> None:
    v = self.cfg.model.vocab_size
    if not prompts:
      raise ValueError("prompts: no prompt given (an empty prompt file?)")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
      raise ValueError(f"--max-new-tokens {max_new!r} is not allowed: it must be an integer "
                       ">= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"--batch-size {batch_size!r} is not allowed: it must be an integer "
                       ">= 1")
    for i, x in enumerate(prompts):
      if x.size == 0:
        raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
      if x.min() < 0 or x.max() >= v:
        raise ValueError(f"prompt {i} has token ids outside [0, {v}) (model.vocab_size): "
                         f"min {x.min()}, max {x.max()}")
      if x.size + max_new > self.context:
        raise ValueError(f"prompt {i} has {x.size} tokens; with --max-new-tokens {max_new} "
                         f"that exceeds the model's maximum context of {self.context} tokens")
    bad = [t for t in stop_tokens if not 0 <= int(t) < v]
    if bad:
      raise ValueError(f"--stop-tokens {bad} lie outside [0, {v}) (model.vocab_size)")


def _model(cfg, cache_len: int) -> TransformerLM:
  return TransformerLM(cfg, True, cache_len)


def _routing_NxBxE(cfg, inter: dict, b: int, e: int) -> jax.Array:
  """Combine weights [N, B, E] of one decoded token per sequence, from the sown routing
  (with a layer-wise schedule, layers with fewer experts have zero weight past theirs)."""
  if layout.is_uniform(cfg):
    a = layout.get(inter, layout.MOE_PATH + ("routing",))[0]["assignment"]
    return jax.vmap(lambda x: x.combine_matrix(b, e))(a)
  return jnp.stack([r[0]["assignment"].combine_matrix(b, e)
                    for r in layout.layer_nodes(cfg, inter, ("routing",), "the sown routing")])


@functools.lru_cache(maxsize=32)
def _prefill_fn(cfg, cache_len: int):
  model = _model(cfg, cache_len)

  @jax.jit
  def fn(variables, ids_BxP, pad_B):
    p = ids_BxP.shape[1]
    slot_P = jnp.arange(p)
    valid_BxP = slot_P[None] >= pad_B[:, None]
    pos_BxP = jnp.maximum(slot_P[None] - pad_B[:, None], 0)
    (logits, _), mut = model.apply(variables, ids_BxP, pos_BxP, valid_BxP, jnp.int32(0),
                                   mutable=["cache"])
    return logits, mut["cache"]

  return fn


@functools.lru_cache(maxsize=32)
def _step_fn(cfg, cache_len: int, trace: bool):
  model = _model(cfg, cache_len)
  cols = ["cache", "intermediates"] if trace else ["cache"]

  @jax.jit
  def fn(variables, cache, ids_BxL, pos_BxL, index):
    (logits, _), mut = model.apply({**variables, "cache": cache}, ids_BxL, pos_BxL,
                                   jnp.ones(ids_BxL.shape, bool), index, mutable=cols)
    route = None
    if trace:
      route = _routing_NxBxE(cfg, mut["intermediates"], ids_BxL.shape[0], cfg.moe.num_experts)
    return logits, mut["cache"], route

  return fn


@functools.lru_cache(maxsize=32)
def _generate_fn(cfg, width: int, max_new: int, sampling: Sampling, trace: bool):
  """jit(variables, ids [B, P] left-padded, pad [B], keys [B], stop ids) ->
  (tokens [B, N], lengths [B], stopped [B], routing [N, layers, B, E] or None)."""
  cache_len = width + max_new
  prefill = _prefill_fn(cfg, cache_len)
  step = _step_fn(cfg, cache_len, trace)
  n_moe = layout.layer_plan(cfg)[1]
  e = cfg.moe.num_experts if n_moe else 0

  @jax.jit
  def fn(variables, ids_BxP, pad_B, keys_B, stop_S):
    b = ids_BxP.shape[0]
    logits_BxPxV, cache = prefill(variables, ids_BxP, pad_B)
    route0 = jnp.zeros((max_new, n_moe, b, e), jnp.float32) if trace else None

    def cond(c):
      i, _, _, _, _, done_B, _, _ = c
      return (i < max_new) & ~jnp.all(done_B)

    def body(c):
      i, cache, logits_BxV, toks_BxN, n_B, done_B, stopped_B, route = c
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
      tok_B = sample(logits_BxV, keys, sampling)
      live_B = ~done_B
      toks_BxN = toks_BxN.at[:, i].set(jnp.where(live_B, tok_B, 0))
      n_B = n_B + live_B
      hit_B = live_B & jnp.isin(tok_B, stop_S)
      pos_B = width - pad_B + i
      logits, cache, r = step(variables, cache, tok_B[:, None], pos_B[:, None], width + i)
      if trace:
        route = route.at[i].set(r)
      return (i + 1, cache, logits[:, 0], toks_BxN, n_B, done_B | hit_B, stopped_B | hit_B,
              route)

    init = (jnp.int32(0), cache, logits_BxPxV[:, -1], jnp.zeros((b, max_new), jnp.int32),
            jnp.zeros(b, jnp.int32), jnp.zeros(b, bool), jnp.zeros(b, bool), route0)
    _, _, _, toks, n_B, _, stopped_B, route = jax.lax.while_loop(cond, body, init)
    return toks, n_B, stopped_B, route

  return fn


def to_trace(cfg: ml_collections.ConfigDict, gens: Sequence[Generation],
             weights_TxNxE: np.ndarray):
  """The routing `generate(..., trace=True)` returned, as a `moejax.inference.trace.Trace`:
  per generated token its experts by descending weight, position and prompt index."""
  from moejax.analysis.routing import moe_layers  # noqa: PLC0415
  from moejax.inference import trace as trace_lib  # noqa: PLC0415

  w = np.asarray(weights_TxNxE, np.float32)
  seq = [np.full(g.tokens.size, i, np.int32) for i, g in enumerate(gens)]
  pos = [g.prompt_tokens.size + np.arange(g.tokens.size, dtype=np.int32) for g in gens]
  return trace_lib.from_dense(
      w > 0, w, token_ids_T=np.concatenate([g.tokens for g in gens]).astype(np.int32),
      positions_T=np.concatenate(pos), sequence_T=np.concatenate(seq), layers=moe_layers(cfg),
      num_experts=int(cfg.moe.num_experts), model=trace_lib.fingerprint(cfg))
