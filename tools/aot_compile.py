"""Compile a config's training step for TPU slices on this (CPU) host; report memory and FLOPs.

  python tools/aot_compile.py --config configs/pod_v5e64.py --topology v5e:8x8
  python tools/aot_compile.py --config configs/pod_v5e64.py --topology v5e:8x8,v6e:8x8 \
      --exchange auto,padded --config.model.remat=False --json aot.jsonl
  python tools/aot_compile.py --config configs/pod_v5e64.py --topology v5p:4x4x4
  python tools/aot_compile.py --config configs/quickstart.py --gpu

For every topology (`GEN:SHAPE`, moejax/aot/topology.py) and expert-parallel
exchange it builds the step as the trainer would on that slice, runs the TPU
compiler and prints one markdown row: the mesh, whether it fits one chip's
HBM, the per-chip memory (peak = arguments + outputs not aliased to them +
temporaries + code), the model's FLOPs per chip per step and the time they
take at the chip's bf16 peak, and the lowering and compile times. `--json
FILE` appends every result as one JSON line (all fields of
moejax.aot.train_step.TpuCompile). `--exchange` (the expert-parallel
dropless exchange): `auto` is what the trainer picks on that slice
(`ragged` except on v5e slices above 16 chips, where the TPU compiler
refuses it), `ragged` is `ragged_all_to_all`, `padded` the worst-case-sized
`all_to_all` (what the trainer uses on CPU). `--gpu` instead lowers
the one-device step for CUDA and counts its Triton kernels. Needs libtpu for
TPU targets: pip install -e '.[tpu]'. Exit status 2 for bad arguments, 1 if
any compilation did not fit or failed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compile-only TPU devices need no TPU backend in this process; keep JAX on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

EXCHANGES = {"auto": None, "ragged": True, "padded": False}
HEADER = ("| config | topology | mesh (data, fsdp, expert) | exchange | fits | peak GiB / HBM GiB "
          "| args GiB | temp GiB | model TFLOP/chip/step | ms at peak | lower s | compile s |")


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f}"


def row(r) -> str:
  """One markdown table row of a TpuCompile (see HEADER)."""
  from moejax.aot.topology import parse_topology  # noqa: PLC0415
  peak = parse_topology(r.topology).chip.peak_bf16_flops
  mesh = ", ".join(str(r.mesh[a]) for a in ("data", "fsdp", "expert"))
  fits = {"fits": "yes", "out_of_memory": "no (out of memory)"}.get(r.status, "compile error")
  known = r.status == "fits"
  peak_mem = _gib(r.required_bytes) if known else (
      f">= {_gib(r.required_bytes)}" if r.required_bytes else "-")
  mem = f"{peak_mem} / {_gib(r.hbm_bytes)}"
  return (f"| {r.config} | {r.topology} | {mesh} | {'ragged' if r.ragged else 'padded'} "
          f"| {fits} | {mem} | {_gib(r.argument_bytes) if known else '-'} "
          f"| {_gib(r.temp_bytes) if known or r.temp_bytes else '-'} | {r.model_flops / 1e12:.2f} "
          f"| {1e3 * r.model_flops / peak:.1f} | {r.lower_s:.1f} | {r.compile_s:.1f} |")


def parse_list(flag: str, value: str, allowed=None) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if not items:
    raise ValueError(f"--{flag}={value!r} is empty; give a comma-separated list")
  for v in items:
    if allowed is not None and v not in allowed:
      raise ValueError(f"--{flag}={value!r}: {v!r} is unknown; allowed: {', '.join(allowed)}")
  return items


def main() -> None:
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2", "Comma-separated TPU slices GEN:SHAPE.")
  flags.DEFINE_string("exchange", "auto", "Comma-separated EP exchanges: auto, ragged, padded.")
  flags.DEFINE_string("json", None, "Append each result as a JSON line to this file.")
  flags.DEFINE_bool("gpu", False, "Lower the one-device step for CUDA instead.")
  flags.mark_flags_as_required(["config"])

  def run(_):
    from absl import logging  # noqa: PLC0415
    logging.set_verbosity(logging.ERROR)
    from moejax.aot import topology as topo_lib  # noqa: PLC0415
    from moejax.aot import train_step  # noqa: PLC0415
    f = flags.FLAGS
    cfg = f.config
    if f.gpu:
      try:
        g = train_step.lower_for_gpu(cfg)
      except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
      print(f"{g.config}: lowered for cuda in {g.lower_s:.1f} s, gmm_backend={g.gmm_backend}, "
            f"{g.triton_kernels} Triton kernel calls, {g.text_bytes} bytes of StableHLO")
      return
    try:
      topologies = [topo_lib.parse_topology(t)
                    for t in parse_list("topology", f.topology)]
      exchanges = parse_list("exchange", f.exchange, tuple(EXCHANGES))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    if not topo_lib.libtpu_available():
      print("error: compiling for a TPU needs libtpu (the TPU compiler): "
            "pip install -e '.[tpu]'", file=sys.stderr)
      sys.exit(2)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    failed = False
    for topo in topologies:
      for exchange in exchanges:
        try:
          r = train_step.compile_for_tpu(cfg, topo, ragged=EXCHANGES[exchange])
        except ValueError as e:  # ConfigError: the mesh does not fit this slice, ...
          print(f"error: {topo.name}: {e}", file=sys.stderr)
          sys.exit(2)
        print(row(r), flush=True)
        if not r.fits:
          failed = True
          print(f"  {r.topology} {exchange}: {r.error}", file=sys.stderr)
        if f.json:
          with open(f.json, "a") as fh:
            fh.write(json.dumps(r.as_dict(), sort_keys=True) + "\n")
    sys.exit(1 if failed else 0)

  app.run(run)


if __name__ == "__main__":
  main()
