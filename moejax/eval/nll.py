"""Negative log-likelihood of token sequences under a run's model.

The NLL of a sequence ids[0..n) is that of ids[1:] given their prefixes, the
quantity transformers computes with `labels=ids`: nothing is prepended to
given token ids. Texts are tokenized with the run's `data.tokenizer` and its
rules for one text (the byte tokenizer's BOS/EOS, a tokenizer.json's
post-processor), and their UTF-8 bytes give bits per byte.

Sequences are scored in batches, right-padded to a power-of-two length (one
compilation per length class); the model is causal, so padding changes no
real position's logits. With a capacity dispatcher or expert-choice routing,
tokens compete for expert slots within a batch, as in training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import model as lm
from moejax.train import tokenizer as tok_lib

MIN_PAD = 16  # shortest padded length class


@dataclasses.dataclass(frozen=True)
class Record:
  """One sequence to score; `text_bytes` is None for records given as token ids."""

  ids: np.ndarray  # int32 [n], n >= 2
  text_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class Scores:
  """Summed NLL (nats) and predicted-token counts per record, and the totals."""

  nll_R: np.ndarray  # float64 [R]
  tokens_R: np.ndarray  # int64 [R]: len(ids) - 1
  text_bytes: int | None  # all records are texts: their UTF-8 bytes; else None

  @property
  def tokens(self) -> int:
    return int(self.tokens_R.sum())

  @property
  def mean_nll(self) -> float:
    return float(self.nll_R.sum() / self.tokens)

  @property
  def bits_per_byte(self) -> float | None:
    if self.text_bytes is None:
      return None
    return float(self.nll_R.sum() / math.log(2.0) / self.text_bytes)

  def summary(self) -> dict:
    out = {"mean_nll": self.mean_nll, "tokens": self.tokens}
    if self.text_bytes is not None:
      out["bits_per_byte"] = self.bits_per_byte
    return out


def read_jsonl(path: str | os.PathLike, tokenizer: tok_lib.Tokenizer, vocab_size: int
               ) -> list[Record]:
  """Records of a JSONL file: each line {"text": str} or {"tokens": [int, ...]}.

  One kind per file (bits per byte need every record to be text). Raises
  ValueError naming the file, the 1-based line and what is allowed.
  """
  allowed = 'allowed: one JSON object per line, {"text": "..."} or {"tokens": [ids]}'
  records: list[Record] = []
  kinds: set[str] = set()
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"--data {os.fspath(path)!r} line {n}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e.msg}); {allowed}") from None
      if not isinstance(obj, dict) or len({"text", "tokens"} & set(obj)) != 1:
        raise ValueError(f"{where} must hold exactly one of 'text' or 'tokens'; {allowed}")
      if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
          raise ValueError(f"{where}: 'text' is a {type(text).__name__}; {allowed}")
        ids = tokenizer.encode_document(text).astype(np.int32)
        rec = Record(ids, len(text.encode("utf-8")))
        kinds.add("text")
      else:
        toks = obj["tokens"]
        if (not isinstance(toks, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks)):
          raise ValueError(f"{where}: 'tokens' must be a list of integer ids; {allowed}")
        ids = np.asarray(toks, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
          raise ValueError(f"{where}: token ids must lie in [0, {vocab_size}) "
                           f"(model.vocab_size); got min {ids.min()}, max {ids.max()}")
        rec = Record(ids.astype(np.int32))
        kinds.add("tokens")
      if len(kinds) > 1:
        raise ValueError(f"{where} mixes 'text' and 'tokens' records; use one kind per file")
      if rec.ids.size < 2:
        raise ValueError(f"{where} gives {rec.ids.size} token(s); scoring needs at least 2 "
                         "(the first is only context)")
      records.append(rec)
  if not records:
    raise ValueError(f"--data {os.fspath(path)!r} holds no records; {allowed}")
  return records


@functools.lru_cache(maxsize=8)
def _logprob_fn(frozen: ml_collections.FrozenConfigDict):
  model = lm.make_model(frozen, deterministic=True)

  @jax.jit
  def fn(variables, ids_BxL):
    logits_BxLxV, _ = model.apply(variables, ids_BxL)
    z = logits_BxLxV[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    tgt_BxL1 = jnp.take_along_axis(logp, ids_BxL[:, 1:, None], axis=-1)[..., 0]
    return tgt_BxL1, jnp.argmax(z, axis=-1) == ids_BxL[:, 1:]

  return fn


def pad_len(n: int) -> int:
  """The padded length class of n tokens: the next power of two, at least MIN_PAD (one
  compilation per class)."""
  return max(MIN_PAD, 1 << (n - 1).bit_length())


def token_logprobs(cfg: ml_collections.ConfigDict, variables: dict,
                   seqs: list[np.ndarray], batch_size: int = 8
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per sequence ids[0..n): (log p(ids[i] | ids[:i]) float32 [n-1], whether ids[i] is the
  argmax there, bool [n-1]), in the given order."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is not allowed; it must be a positive integer")
  fn = _logprob_fn(ml_collections.FrozenConfigDict(cfg))
  order = sorted(range(len(seqs)), key=lambda i: -seqs[i].size)
  out: list = [None] * len(seqs)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = pad_len(seqs[rows[0]].size)
    ids_BxL = np.zeros((batch_size, width), np.int32)
    for b, r in enumerate(rows):
      ids_BxL[b, :seqs[r].size] = seqs[r]
    logp, greedy = jax.device_get(fn(variables, jnp.asarray(ids_BxL)))
    for b, r in enumerate(rows):
      n = seqs[r].size
      out[r] = (np.asarray(logp[b, :n - 1], np.float32), np.asarray(greedy[b, :n - 1], bool))
  return out


def score(cfg: ml_collections.ConfigDict, variables: dict, records: list[Record],
          batch_size: int = 8) -> Scores:
  """Summed NLL of every record (in the given order) under `variables`."""
  per = token_logprobs(cfg, variables, [r.ids for r in records], batch_size)
  nll_R = np.asarray([-np.sum(lp, dtype=np.float64) for lp, _ in per], np.float64)
  tokens_R = np.asarray([r.ids.size - 1 for r in records], np.int64)
  is_text = all(r.text_bytes is not None for r in records)
  text_bytes = sum(r.text_bytes for r in records) if is_text else None
  return Scores(nll_R, tokens_R, text_bytes)
