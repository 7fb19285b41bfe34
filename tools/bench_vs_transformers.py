"""Forward-pass time of a converted Mixtral: moejax vs transformers, same machine and process.

  python tools/bench_vs_transformers.py [--d-model 256] [--layers 4] [--experts 8] [--top-k 2]
      [--expert-hidden 512] [--heads 8] [--kv-heads 2] [--vocab 1024] [--batch 4]
      [--seq-len 256] [--warmup 4] [--repeats 11] [--hf-experts IMPL] [--set KEY=VALUE ...]

Builds a random float32 Mixtral with transformers (weights at O(1) scale, as in
tests/interop, so that router choices have no near-ties), saves it in a
temporary directory under /tmp (deleted afterwards), converts it with
`moejax.interop.from_hf` (--set: keys that do not change the model, e.g.
moe.dispatch=dense) and loads the run with `moejax.analysis.load_model`.
Both sides run the same token ids [batch, seq_len] to logits [batch,
seq_len, vocab]: moejax `model.apply` (jitted, block_until_ready) and
transformers `model(ids).logits` (eval mode, torch.no_grad; --hf-experts
picks its experts implementation, default: transformers' choice). After
--warmup untimed rounds the calls alternate round by round
(tools/timing.py) and the medians of --repeats rounds are compared.

Prints the shape, the thread counts, transformers' attention and experts
implementations, max |logit diff| / logit scale (both compute the same
function), both median times in ms and the ratio moejax / transformers
(target <= 1.0).
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


def random_mixtral(args: argparse.Namespace):
  """A transformers Mixtral of the requested shape with O(1) random weights, in eval mode."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  kw = {} if args.hf_experts is None else {"experts_implementation": args.hf_experts}
  cfg = transformers.AutoConfig.for_model(
      "mixtral", vocab_size=args.vocab, hidden_size=args.d_model,
      intermediate_size=args.expert_hidden, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      num_local_experts=args.experts, num_experts_per_tok=args.top_k)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **kw)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("gate.weight"):  # routers [E, d_model]
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5)
  return model.eval()


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
  for name in ("d_model", "layers", "experts", "top_k", "expert_hidden", "heads", "kv_heads",
               "vocab", "batch", "seq_len", "warmup", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if args.top_k > args.experts:
    p.error(f"--top-k={args.top_k} must be <= --experts={args.experts}")
  if args.d_model % args.heads:
    p.error(f"--heads={args.heads} must divide --d-model={args.d_model}")
  if args.heads % args.kv_heads:
    p.error(f"--kv-heads={args.kv_heads} must divide --heads={args.heads}")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--expert-hidden", type=int, default=512, help="Mixtral intermediate_size")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--warmup", type=int, default=4, help="untimed rounds (the first compiles)")
  p.add_argument("--repeats", type=int, default=11, help="timed rounds; medians are compared")
  p.add_argument("--hf-experts", default=None,
                 help="transformers experts_implementation (eager, grouped_mm, batched_mm); "
                      "default: transformers' choice")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="moejax config keys that do not change the model (moe.dispatch, ...)")
  args = p.parse_args(argv)
  _check(args, p)

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import torch  # noqa: PLC0415

  from moejax import analysis, interop  # noqa: PLC0415
  from moejax import model as lm  # noqa: PLC0415
  from timing import time_interleaved  # noqa: PLC0415

  try:
    overrides = interop.parse_overrides(args.set)
  except ValueError as e:
    p.error(str(e))
  hf_model = random_mixtral(args)
  root = tempfile.mkdtemp(prefix="moejax-bench-vs-hf-", dir="/tmp")
  try:
    hf_dir, run_dir = os.path.join(root, "hf"), os.path.join(root, "run")
    hf_model.save_pretrained(hf_dir)
    interop.from_hf(hf_dir, run_dir, overrides)
    run = analysis.load_model(run_dir)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  cfg = run.cfg
  variables = jax.device_put(run.variables)
  ids_BxL = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len))
  ids_jax_BxL = jnp.asarray(ids_BxL, jnp.int32)
  ids_torch_BxL = torch.tensor(ids_BxL)

  def moejax_forward():
    return lm.apply(variables, ids_jax_BxL, cfg)[0]

  def transformers_forward():
    with torch.no_grad():
      return hf_model(ids_torch_BxL).logits

  ours_BxLxV = np.asarray(moejax_forward())
  theirs_BxLxV = transformers_forward().numpy()
  scale = float(np.abs(theirs_BxLxV).max())
  rel = float(np.abs(ours_BxLxV - theirs_BxLxV).max()) / scale
  secs = time_interleaved({"moejax": (moejax_forward, ()),
                           "transformers": (transformers_forward, ())},
                          args.repeats, warmup=args.warmup, slow_s=60.0)
  tokens = args.batch * args.seq_len
  print(f"Mixtral float32: d_model {args.d_model}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), E={args.experts} x {args.expert_hidden} top-{args.top_k}, "
        f"vocab {args.vocab}; ids [{args.batch}, {args.seq_len}] = {tokens} tokens")
  print(f"jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device), "
        f"moe.dispatch={cfg.moe.dispatch}, moe.gmm_backend={cfg.moe.gmm_backend}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), attention "
        f"{hf_model.config._attn_implementation}, experts "
        f"{hf_model.config._experts_implementation}")
  print(f"max |moejax - transformers| / max |logit| = {rel:.2e} (scale {scale:.1f})")
  print(f"warmup {args.warmup}, {args.repeats} interleaved rounds, medians:")
  for name, s in secs.items():
    print(f"  {name:12s} {1e3 * s:9.2f} ms  ({tokens / s:,.0f} tokens/s)")
  ratio = secs["moejax"] / secs["transformers"]
  print(f"moejax / transformers = {ratio:.2f}x (target <= 1.0: "
        f"{'met' if ratio <= 1.0 else 'not met'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
