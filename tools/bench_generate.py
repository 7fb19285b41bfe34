"""Decode speed: moejax's cached decoder vs transformers' generate, and vs no cache.

  python tools/bench_generate.py [--models quickstart,tiny] [--batches 1,8]
      [--prompt-len 32] [--new-tokens 64] [--context 512] [--repeats 5]

For each model shape a random float32 Mixtral is built with transformers (O(1)
weights, as tools/bench_vs_transformers.py builds it), saved under /tmp and
converted with `moejax.interop.from_hf`: "quickstart" has the quickstart MoE's
shape (configs/quickstart.py: d_model 128, 4 layers, 4 heads, E=8, k=2,
experts 256 wide, vocab 258), "tiny" is d_model 64, 2 layers, 4 heads (2 KV
heads), E=4, k=2, experts 128 wide, vocab 300. Per batch size both sides
greedily continue the same random prompts of --prompt-len tokens by exactly
--new-tokens tokens (no stop token): moejax `Decoder.generate` (prefill plus a
jit-compiled decode loop) and transformers `model.generate(do_sample=False)`
with its default dynamic KV cache, timed alternately (tools/timing.py),
medians of --repeats rounds. Prints new tokens per second of each, the ratio
moejax / transformers (target >= 1 at batch 8), and whether the generated
tokens agree.

Then, at batch 1, the per-token cost near --context tokens of context: the
decode loop's marginal time per token (generating 2h minus generating h new
tokens after a prompt of context - 2h tokens, divided by h; h = 32) against
re-running the full forward over --context tokens, which is what decoding
without a cache costs per token (target: cached >= 10x faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/: timing

import numpy as np  # noqa: E402

SHAPES = {
    "quickstart": dict(d_model=128, layers=4, heads=4, kv_heads=4, experts=8, top_k=2,
                       expert_hidden=256, vocab=258),
    "tiny": dict(d_model=64, layers=2, heads=4, kv_heads=2, experts=4, top_k=2,
                 expert_hidden=128, vocab=300),
}


def _ints(text: str, arg: str) -> list[int]:
  try:
    out = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise SystemExit(f"error: {arg} {text!r} must be comma-separated integers") from None
  if not out or min(out) < 1:
    raise SystemExit(f"error: {arg} {text!r} must list integers >= 1")
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="quickstart,tiny", help=f"of {list(SHAPES)}")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--context", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  bad = [m for m in models if m not in SHAPES]
  if bad or not models:
    p.error(f"--models {args.models!r}: unknown {bad}; allowed: {list(SHAPES)}")
  batches = _ints(args.batches, "--batches")
  for name in ("prompt_len", "new_tokens", "context", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")

  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415

  from bench_vs_transformers import random_mixtral  # noqa: PLC0415
  from moejax import interop  # noqa: PLC0415
  from moejax import model as lm  # noqa: PLC0415
  from moejax.inference import decode  # noqa: PLC0415
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from timing import time_interleaved  # noqa: PLC0415

  print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32, greedy, {args.prompt_len}-token "
        f"prompts, {args.new_tokens} new tokens")
  print("model       batch  moejax tok/s  transformers tok/s  ratio  tokens agree")
  rows = []
  for name in models:
    shape = argparse.Namespace(**SHAPES[name], hf_experts=None)
    hf = random_mixtral(shape)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    root = tempfile.mkdtemp(prefix="moejax-bench-generate-", dir="/tmp")
    try:
      hf.save_pretrained(os.path.join(root, "hf"))
      run_dir = os.path.join(root, "run")
      interop.from_hf(os.path.join(root, "hf"), run_dir)
      cfg = run_config(run_dir)
      params, collections, _ = load_run(run_dir)
    finally:
      shutil.rmtree(root, ignore_errors=True)
    variables = jax.device_put({"params": params, **collections})
    dec = decode.Decoder(cfg, variables, context=args.context + args.new_tokens)
    rng = np.random.default_rng(0)
    for b in batches:
      prompts_BxP = rng.integers(0, shape.vocab, (b, args.prompt_len))
      ids_t = torch.tensor(prompts_BxP)
      n = args.new_tokens

      def ours():
        return dec.generate(prompts_BxP.tolist(), max_new_tokens=n, batch_size=b)[0]

      def theirs():
        with torch.no_grad():
          return hf.generate(ids_t, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids_t))

      got = np.stack([g.tokens for g in ours()])
      want = theirs()[:, args.prompt_len:].numpy()
      agree = float((got == want).mean())
      secs = time_interleaved({"moejax": (ours, ()), "transformers": (theirs, ())},
                              args.repeats, warmup=2, slow_s=120.0)
      tps = {k: b * n / v for k, v in secs.items()}
      rows.append((name, b, tps["moejax"], tps["transformers"]))
      print(f"{name:<11} {b:>5}  {tps['moejax']:>12.0f}  {tps['transformers']:>18.0f}  "
            f"{tps['moejax'] / tps['transformers']:>5.2f}  {agree:>12.0%}")

    # Per-token cost near `context` tokens: the decode loop's marginal cost per token
    # (generate 2h minus h new tokens after a context-2h prompt, over h) vs a full forward.
    ctx, h = args.context, max(1, min(32, args.context // 4))
    prompt = rng.integers(0, shape.vocab, (1, ctx - 2 * h)).tolist()
    full_ids = jax.device_put(rng.integers(0, shape.vocab, (1, ctx)).astype(np.int32))
    dec_ctx = decode.Decoder(cfg, variables, context=ctx)

    def gen(k):
      return lambda: dec_ctx.generate(prompt, max_new_tokens=k, stop_tokens=())[0]

    def full():
      return lm.apply(variables, full_ids, cfg)[0]

    secs = time_interleaved({"long": (gen(2 * h), ()), "short": (gen(h), ()), "full": (full, ())},
                            3 * args.repeats, warmup=3)
    step = max(secs["long"] - secs["short"], 1e-9) / h
    rows.append((name, "per-token", step, secs["full"]))
    print(f"{name:<11} per token at ~{ctx} context: cached decode {step * 1e3:.3f} ms, "
          f"full forward {secs['full'] * 1e3:.2f} ms: {secs['full'] / step:.1f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
