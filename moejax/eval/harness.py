"""A moejax run as an lm-evaluation-harness model (lm-eval's `LM` interface, name "moejax").

`python -m moejax.lm_eval --model_args run=RUN_DIR --tasks TASK ...` registers it
and hands every other argument to lm-eval's command line (moejax/lm_eval.py).
Model arguments: run (required), step (-1: newest checkpoint), dispatch (as
tools/generate.py's --dispatch), max_length (default: the run's maximum
context, moejax.inference.decode.max_context); lm-eval's --batch_size is the
number of sequences per forward pass.

Tokenization follows the run's data.tokenizer and its rules for one text, as
tools/evaluate.py does:
- loglikelihood(context, continuation): the context is tokenized as a
  prompt (its document-start tokens such as BOS, no end token), the
  continuation as the tokens that (context + continuation) adds to it, with
  the context's trailing whitespace moved to the continuation (lm-eval's
  convention); an empty context conditions on BOS, or EOS for tokenizers
  without BOS. Contexts longer than max_length keep their last tokens.
- loglikelihood_rolling(text): the NLL of the document as tools/evaluate.py
  scores a {"text"} record (the tokenizer's document ids, every token after
  the first predicted), in windows of max_length that each predict new
  tokens only (lm-eval's rolling windows), so it equals evaluate.py's NLL
  whenever the document fits one window.
- generate_until(context, gen_kwargs): the cached decoder; `until` strings
  cut the text after generation, the checkpoint's EOS stops it; greedy
  unless do_sample (temperature, top_k, top_p as tools/generate.py).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from moejax.eval import nll
from moejax.inference import decode, sampling
from moejax.train import tokenizer as tok_lib

DEFAULT_GEN_TOKS = 256


def _int_arg(name: str, value: Any, minimum: int) -> int:
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"--model_args {name}={value!r} must be an integer") from None
  if out < minimum:
    raise ValueError(f"--model_args {name}={value!r} must be >= {minimum}")
  return out


@register_model("moejax")
class MoejaxLM(LM):
  """lm-eval's loglikelihood / loglikelihood_rolling / generate_until on a moejax run."""

  def __init__(self, run: str | None = None, step: int = -1, dispatch: str | None = None,
               max_length: int | None = None, batch_size: int | str | None = 8,
               max_batch_size: int | None = None, device: str | None = None):
    super().__init__()
    from moejax.init.sources import load_run, run_config  # noqa: PLC0415

    if not run:
      raise ValueError("--model_args run=RUN_DIR is required (a moejax run directory)")
    if not os.path.exists(os.path.join(run, "config.json")):
      raise ValueError(f"--model_args run={run!r} is not a run directory (no config.json)")
    if device not in (None, "cpu") and not str(device).startswith(("cuda", "tpu", "gpu")):
      raise ValueError(f"--device {device!r}: moejax runs on JAX's default device; allowed: "
                       "cpu, cuda[:N], gpu, tpu (JAX picks the platform)")
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
      batch_size = max_batch_size or 8
    self.batch = _int_arg("batch_size", batch_size, 1)
    cfg = run_config(run)
    if dispatch is not None:
      if dispatch not in ("dense", "dropless"):
        raise ValueError(f"--model_args dispatch={dispatch!r}; allowed: dense, dropless")
      cfg.moe.dispatch = dispatch
    self.cfg = cfg
    self.tok = tok_lib.get(cfg.data.get("tokenizer", tok_lib.BYTES))
    params, collections, self.step = load_run(run, _int_arg("step", step, -1))
    self.variables = {"params": params, **collections}
    context = decode.max_context(cfg, run)
    self.max_length = _int_arg("max_length", max_length, 2) if max_length else context
    self._run = run
    self._decoder: decode.Decoder | None = None

  # ------------------------------------------------------------------ tokens

  def _prompt(self, text: str) -> list[int]:
    ids = self.tok.encode_prompt(text).tolist()
    if not ids:  # a tokenizer that adds nothing to an empty text
      start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
      if start is None:
        raise ValueError("an empty context needs a BOS or EOS token; the run's tokenizer "
                         f"{self.tok.name!r} has neither")
      ids = [int(start)]
    return ids

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
      context, continuation = context[:-n], context[-n:] + continuation
    ctx = self._prompt(context)
    whole = self._prompt(context + continuation)
    if whole[:len(ctx)] != ctx:  # the tokenizer merges across the boundary
      whole = ctx + [int(i) for i in self.tok.encode(continuation)]
    return ctx, whole[len(ctx):]

  # ------------------------------------------------------------------ scoring

  def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), cont is greedy) per (ctx, cont); inputs keep their last
    max_length tokens."""
    seqs = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("loglikelihood: a continuation that tokenizes to no token")
      seqs.append(np.asarray((ctx + cont)[-(self.max_length + 1):], np.int32))
    per = nll.token_logprobs(self.cfg, self.variables, seqs, self.batch)
    out = []
    for (_, cont), (lp, greedy) in zip(pairs, per):
      k = len(cont)
      out.append((float(np.sum(lp[-k:], dtype=np.float64)), bool(greedy[-k:].all())))
    return out

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [self._pair(*r.args) for r in requests]
    out = self._score(pairs)
    for r, o in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, o)
    return out

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for r in requests:
      (text,) = r.args
      ids = [int(i) for i in self.tok.encode_document(text)]
      if len(ids) < 2:
        raise ValueError(f"loglikelihood_rolling: {text!r} tokenizes to {len(ids)} token(s); "
                         "at least 2 are needed (the first is only context)")
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=ids[1:], prefix_token=ids[0], max_seq_len=self.max_length,
          context_len=1)]
      total = sum(lp for lp, _ in self._score([(list(c), list(p)) for c, p in windows]))
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
      out.append(total)
    return out

  # ------------------------------------------------------------------ generation

  def generate_until(self, requests) -> list[str]:
    if self._decoder is None:
      self._decoder = decode.Decoder(self.cfg, self.variables, context=self.max_length)
    out = []
    stop_ids = [] if self.tok.eos_id is None else [int(self.tok.eos_id)]
    for r in requests:
      context, kw = r.args
      kw = dict(kw or {})
      until = kw.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      n = _int_arg("max_gen_toks", kw.pop("max_gen_toks", DEFAULT_GEN_TOKS), 1)
      if kw.pop("do_sample", False):
        samp = sampling.Sampling(False, float(kw.pop("temperature", 1.0)),
                                 int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0)))
      else:
        kw.pop("temperature", None)
        samp = sampling.Sampling()
      seed = int(kw.pop("seed", 0))
      if kw:
        raise ValueError(f"generate_until: unsupported gen_kwargs {sorted(kw)}; allowed: until, "
                         "max_gen_toks, do_sample, temperature, top_k, top_p, seed")
      ctx = self._prompt(context)[-max(1, self.max_length - n):]
      (g,), _ = self._decoder.generate([ctx], max_new_tokens=n, sampling=samp, seed=seed,
                                       stop_tokens=stop_ids)
      body = g.tokens[:-1] if g.stopped else g.tokens
      text = self.tok.decode(body)
      for s in until:
        if s and s in text:
          text = text[:text.index(s)]
      self.cache_hook.add_partial("generate_until", r.args, text)
      out.append(text)
    return out
