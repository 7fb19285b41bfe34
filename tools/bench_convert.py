"""Peak memory (RSS) of converting a Hugging Face checkpoint of S bytes, both directions.

  python tools/bench_convert.py [--size-mb 600] [--shards 4]

Builds a random Mixtral with transformers (float32, vocab 1024, d_model 512,
8 experts of width 1536, as many layers as make about --size-mb MB) and saves
it with `save_pretrained(max_shard_size=S / --shards)` in a temporary
directory under /tmp (deleted afterwards). Then, each in a fresh
subprocess, reads the peak RSS (`os.wait4` rusage ru_maxrss of that child):

  baseline  a process that imports what `tools/convert.py` imports and starts
            JAX's CPU backend (the constant overhead);
  from-hf   python tools/convert.py from-hf HF_DIR RUN_DIR
  to-hf     python tools/convert.py to-hf RUN_DIR OUT_DIR (same shard size)
  to-hf (trainer-written)
            the same, of the run directory re-saved by `trainer.write_run` (the
            trainer's own checkpoint writer, which every trained run goes through)

Prints the checkpoint (S in MB = 1e6 bytes, shards, layers), the baseline,
and per conversion: S, peak RSS, peak - baseline, (peak - baseline) / S and
the wall time. Target: peak RSS < S/2 + a constant, i.e. (peak - baseline) / S
clearly below 0.5.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(REPO, "tools", "convert.py")
MB = 1e6

# The model besides its layer count (each layer: 8 experts x 3 x 512 x 1536 float32 = 75.5 MB).
VOCAB, D_MODEL, EXPERT_HIDDEN, NUM_EXPERTS, TOP_K, NUM_HEADS, NUM_KV_HEADS = (
    1024, 512, 1536, 8, 2, 8, 2)

# What tools/convert.py and moejax.interop import on either path, plus JAX's backend.
BASELINE = """
import jax, jax.numpy as jnp, orbax.checkpoint, safetensors, optax
from moejax.interop import ConversionError, from_hf, to_hf
from moejax.init import hooks, sources
from moejax.train import checkpoint, data, optimizer, trainer
jnp.zeros(1).block_until_ready()
"""


def layer_bytes() -> int:
  """float32 bytes of one Mixtral decoder layer of the benchmark's shape."""
  head_dim = D_MODEL // NUM_HEADS
  attn = 2 * D_MODEL * D_MODEL + 2 * D_MODEL * NUM_KV_HEADS * head_dim  # q, o; k, v
  experts = NUM_EXPERTS * 3 * D_MODEL * EXPERT_HIDDEN
  return 4 * (attn + experts + NUM_EXPERTS * D_MODEL + 2 * D_MODEL)  # + router, 2 norms


def checkpoint_bytes(num_layers: int) -> int:
  """float32 bytes of the benchmark's Mixtral with `num_layers` layers."""
  return num_layers * layer_bytes() + 4 * (2 * VOCAB + 1) * D_MODEL  # + embed, lm_head, norm


def num_layers_for(size_bytes: int) -> int:
  """Layers that bring the checkpoint closest to `size_bytes` (at least 1)."""
  return max(1, round((size_bytes - checkpoint_bytes(0)) / layer_bytes()))


def build_checkpoint(hf_dir: str, num_layers: int, shard_bytes: int) -> None:
  """A random float32 Mixtral saved in shards of at most `shard_bytes` (runs in a child)."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  cfg = transformers.AutoConfig.for_model(
      "mixtral", vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=EXPERT_HIDDEN,
      num_hidden_layers=num_layers, num_attention_heads=NUM_HEADS,
      num_key_value_heads=NUM_KV_HEADS, num_local_experts=NUM_EXPERTS,
      num_experts_per_tok=TOP_K)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  model.save_pretrained(hf_dir, max_shard_size=shard_bytes)


def resave(run_dir: str, out_dir: str) -> None:
  """Re-save a run's params and collections with `trainer.write_run` (runs in a child)."""
  from moejax.init.sources import load_run, run_config  # noqa: PLC0415
  from moejax.train import trainer  # noqa: PLC0415

  params, collections, _ = load_run(run_dir)
  trainer.write_run(run_config(run_dir), {"params": params, **collections}, out_dir)


def safetensors_bytes(hf_dir: str) -> tuple[int, int]:
  """(total bytes, number) of the *.safetensors files in `hf_dir`."""
  files = glob.glob(os.path.join(hf_dir, "*.safetensors"))
  return sum(os.path.getsize(f) for f in files), len(files)


def peak_rss(cmd: list[str], what: str) -> tuple[int, float]:
  """(peak RSS bytes, wall seconds) of `cmd` run as a fresh child process; raises on failure."""
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  with tempfile.TemporaryFile("w+") as log:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
      log.seek(0)
      raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{log.read()[-4000:]}")
  return usage.ru_maxrss * 1024, wall  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size-mb", type=float, default=600.0,
                 help="checkpoint size S to build, MB (1e6 bytes), float32")
  p.add_argument("--shards", type=int, default=4, help="safetensors shards of the checkpoint")
  p.add_argument("--build", nargs=3, metavar=("HF_DIR", "LAYERS", "SHARD_BYTES"),
                 help=argparse.SUPPRESS)  # the child that builds the checkpoint
  p.add_argument("--resave", nargs=2, metavar=("RUN_DIR", "OUT_DIR"),
                 help=argparse.SUPPRESS)  # the child that re-saves with the trainer
  args = p.parse_args(argv)
  if args.build:
    build_checkpoint(args.build[0], int(args.build[1]), int(args.build[2]))
    return 0
  if args.resave:
    resave(*args.resave)
    return 0
  if args.size_mb <= 0:
    p.error(f"--size-mb={args.size_mb} must be > 0")
  if args.shards < 1:
    p.error(f"--shards={args.shards} must be >= 1")
  if args.size_mb * MB < layer_bytes():
    p.error(f"--size-mb={args.size_mb} is smaller than one decoder layer; allowed: >= "
            f"{layer_bytes() / MB:.0f} (a few hundred MB, so that S dominates the overhead)")
  layers = num_layers_for(int(args.size_mb * MB))
  # transformers closes a shard before the tensor that would overflow it: 2% slack, so that
  # the layer-sized blocks of tensors still fit in --shards shards.
  shard_bytes = int(1.02 * checkpoint_bytes(layers) / args.shards)

  root = tempfile.mkdtemp(prefix="moejax-bench-convert-", dir="/tmp")
  try:
    hf_dir, run_dir, out_dir, trained_dir, out2_dir = (
        os.path.join(root, n) for n in ("hf", "run", "out", "trained", "out2"))
    t = time.perf_counter()
    peak_rss([sys.executable, os.path.abspath(__file__), "--build", hf_dir, str(layers),
              str(shard_bytes)], "building the checkpoint")
    size, shards = safetensors_bytes(hf_dir)
    print(f"checkpoint: S = {size / MB:.1f} MB in {shards} shards (Mixtral float32, vocab "
          f"{VOCAB}, d_model {D_MODEL}, {layers} layers, E={NUM_EXPERTS} x {EXPERT_HIDDEN}, "
          f"top-{TOP_K}); built in {time.perf_counter() - t:.0f} s")
    base, _ = peak_rss([sys.executable, "-c", BASELINE], "baseline")
    print(f"baseline (imports + JAX CPU backend): peak RSS {base / MB:.1f} MB")
    runs = {
        "from-hf": [sys.executable, CONVERT, "from-hf", hf_dir, run_dir],
        "to-hf": [sys.executable, CONVERT, "to-hf", run_dir, out_dir,
                  "--max-shard-gb", repr(shard_bytes / (1 << 30))],
    }
    rows = []
    for name, cmd in runs.items():
      peak, wall = peak_rss(cmd, name)
      rows.append((name, peak, wall))
    peak_rss([sys.executable, os.path.abspath(__file__), "--resave", run_dir, trained_dir],
             "re-saving with the trainer")
    peak, wall = peak_rss([sys.executable, CONVERT, "to-hf", trained_dir, out2_dir,
                           "--max-shard-gb", repr(shard_bytes / (1 << 30))],
                          "to-hf (trainer-written)")
    rows.append(("to-hf (trainer-written)", peak, wall))
    out_size, out_shards = safetensors_bytes(out_dir)
    print(f"to-hf wrote {out_size / MB:.1f} MB in {out_shards} shards")
    print(f"{'conversion':23s} {'S MB':>8s} {'peak RSS MB':>12s} {'peak-base MB':>13s} "
          f"{'(peak-base)/S':>14s} {'wall s':>7s}")
    for name, peak, wall in rows:
      print(f"{name:23s} {size / MB:8.1f} {peak / MB:12.1f} {(peak - base) / MB:13.1f} "
            f"{(peak - base) / size:14.2f} {wall:7.1f}")
    worst = max((peak - base) / size for _, peak, _ in rows)
    print(f"target (peak - baseline) / S < 0.5: {'met' if worst < 0.5 else 'not met'} "
          f"(worst {worst:.2f})")
    print(json.dumps({"size_bytes": size, "shards": shards, "layers": layers,
                      "baseline_rss_bytes": base,
                      **{f"{n.replace(' ', '_')}_peak_rss_bytes": pk for n, pk, _ in rows}}))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
