"""The compression results table of one trained run: every method, measured the same way.

    python tools/compression_study.py --run RUN_DIR --out DIR [--seeds 3] \
        [--distill-steps 100] [--calib-batches 8] [--markdown TABLE.md]

Runs tools/compress.py for each row below on RUN_DIR (calibrating on the
run's *training* split, so no method sees the rows it is scored on), then
distils every compressed run from RUN_DIR for --distill-steps steps
(`--method distill --teacher RUN_DIR`, 0: no distillation rows), and scores
every output on RUN_DIR's validation split (bits per byte, the trainer's
eval: the numbers `python -m experiments` reports). Rows:

  none; prune random (seeds 0..S-1: mean and spread) and prune by frequency,
  gate_weight and output_error, each at 25% and 50% of the experts removed;
  merge to half the experts, aligned and --no-align; quantize int8, int4
  (symmetric, group 32) and mixed precision at an average of 4 bits.

Expert memory is measured: the bytes of the routed experts' arrays in the
loaded variable tree (moejax.compress.quantize.expert_bytes). Each row keeps
the exact command that made it. Results go to DIR/results.json (a list of
rows); a rerun reuses the rows already in DIR, so an interrupted study
resumes. --markdown writes the table (mean +- sample std over seeds where a
row has several).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FRACTIONS = (0.25, 0.5)
CRITERIA = ("frequency", "gate_weight", "output_error")


def rows(num_experts: int, seeds: int) -> list[dict]:
  """The study's compressions: {"name", "group" (rows averaged together), "argv"}."""
  out = [{"name": "none", "group": "none", "argv": None}]
  for f in FRACTIONS:
    pct = int(round(100 * f))
    for s in range(seeds):
      out.append({"name": f"prune-random-{pct}-s{s}", "group": f"prune random {pct}%",
                  "argv": ["--method", "prune", "--criterion", "random", "--remove", str(f),
                           "--seed", str(s)]})
    for c in CRITERIA:
      out.append({"name": f"prune-{c}-{pct}", "group": f"prune {c} {pct}%",
                  "argv": ["--method", "prune", "--criterion", c, "--remove", str(f)]})
  half = num_experts // 2
  out.append({"name": "merge-aligned", "group": f"merge to {half}, aligned",
              "argv": ["--method", "merge", "--to", str(half)]})
  out.append({"name": "merge-unaligned", "group": f"merge to {half}, unaligned",
              "argv": ["--method", "merge", "--to", str(half), "--no-align"]})
  for b in (8, 4):
    out.append({"name": f"int{b}", "group": f"int{b} (sym, group 32)",
                "argv": ["--method", "quantize", "--bits", str(b)]})
  out.append({"name": "mixed-4", "group": "mixed 8/4/2, 4 bits on average",
              "argv": ["--method", "quantize", "--avg-bits", "4"]})
  return out


def _command(argv: list[str]) -> str:
  return " ".join(["python", "tools/compress.py", *argv])


class Scorer:
  """Validation bits per byte and expert bytes of run directories of one source's data."""

  def __init__(self, source: str):
    from moejax.init.sources import run_config  # noqa: PLC0415
    from moejax.train import trainer  # noqa: PLC0415

    cfg = run_config(source)
    data = trainer.prepare(cfg)
    self.val = data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
    self.val_bytes = sum(data.text_bytes(b["targets"]) for b in self.val)

  def __call__(self, run: str) -> dict:
    from moejax.compress.quantize import expert_bytes  # noqa: PLC0415
    from moejax.init.sources import load_run, run_config  # noqa: PLC0415
    from moejax.train import trainer  # noqa: PLC0415

    cfg = run_config(run)
    params, collections, step = load_run(run)
    state = {"params": params, "collections": collections}
    ev = trainer.evaluate(trainer.make_eval_step(cfg), state, self.val, self.val_bytes)
    return {"val_bpb": ev["val/bpb"], "val_loss": ev["val/loss"], "step": int(step),
            "num_experts": int(cfg.moe.num_experts),
            "expert_bytes": expert_bytes({"params": params, **collections})["total"]}


def run_study(args) -> list[dict]:
  import importlib.util  # noqa: PLC0415

  from moejax.init.sources import run_config  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location("tools_compress",
                                                os.path.join(REPO, "tools", "compress.py"))
  compress_tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compress_tool)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      done = {r["name"]: r for r in json.load(f)}
  score = Scorer(args.run)
  results = []

  def record(row: dict) -> None:
    results.append(row)
    with open(path, "w") as f:
      json.dump(results + [r for n, r in done.items()
                           if n not in {x["name"] for x in results}], f, indent=1)

  calib = ["--calib", "train", "--calib-batches", str(args.calib_batches)]
  for row in rows(run_config(args.run).moe.num_experts, args.seeds):
    stages = [(row["name"], row["group"], row["argv"], args.run)]
    if row["argv"] is not None and args.distill_steps > 0:
      stages.append((row["name"] + "+distill", row["group"] + " + distill",
                     ["--method", "distill", "--teacher", args.run, "--steps",
                      str(args.distill_steps)], os.path.join(args.out, row["name"])))
    for name, group, argv, src in stages:
      if name in done:
        results.append(done.pop(name))
        continue
      out = args.run if argv is None else os.path.join(args.out, name)
      command = None
      if argv is not None:
        full = ["--run", src, *argv, *([] if "distill" in argv else calib), "--out", out]
        command = _command(full)
        print(f"[{name}] {command}", flush=True)
        if compress_tool.main(full) != 0:
          raise RuntimeError(f"{command} failed")
      record({"name": name, "group": group, "command": command, **score(out)})
      print(f"[{name}] val bpb {results[-1]['val_bpb']:.4f}, experts "
            f"{results[-1]['expert_bytes'] / 2**20:.2f} MiB", flush=True)
  return results


def table(results: list[dict]) -> str:
  """Markdown: one line per group (mean +- sample std where it has several rows)."""
  import numpy as np  # noqa: PLC0415

  groups: dict[str, list[dict]] = {}
  for r in results:
    groups.setdefault(r["group"], []).append(r)
  base = groups["none"][0]
  lines = ["| compression | experts per layer | expert MiB | val bpb | vs none | command |",
           "|---|---|---|---|---|---|"]
  for g, rs in groups.items():
    bpb = np.asarray([r["val_bpb"] for r in rs])
    rel = 100 * (bpb / base["val_bpb"] - 1)
    if len(rs) > 1:
      val = f"{bpb.mean():.4f} +- {bpb.std(ddof=1):.4f} ({len(rs)} seeds)"
      vs = f"{rel.mean():+.2f}% +- {rel.std(ddof=1):.2f}"
      cmd = f"`{rs[0]['command']}` (--seed 0..{len(rs) - 1})"
    else:
      val, vs = f"{bpb[0]:.4f}", f"{rel[0]:+.2f}%"
      cmd = f"`{rs[0]['command']}`" if rs[0]["command"] else "(the trained run)"
    lines.append(f"| {g} | {rs[0]['num_experts']} | {rs[0]['expert_bytes'] / 2**20:.2f} | "
                 f"{val} | {vs} | {cmd} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="trained run directory")
  p.add_argument("--out", required=True, help="directory for the compressed runs")
  p.add_argument("--seeds", type=int, default=3, help="seeds of the random-pruning rows")
  p.add_argument("--distill-steps", type=int, default=100,
                 help="distillation steps per compressed run (0: no distillation rows)")
  p.add_argument("--calib-batches", type=int, default=8,
                 help="calibration batches (train split) for every method")
  p.add_argument("--markdown", default=None, help="also write the table here")
  args = p.parse_args(argv)
  for flag, value, low in (("--seeds", args.seeds, 1), ("--distill-steps", args.distill_steps, 0),
                           ("--calib-batches", args.calib_batches, 1)):
    if value < low:
      p.error(f"{flag}={value} is invalid: must be >= {low}")
  if not os.path.exists(os.path.join(args.run, "config.json")):
    p.error(f"--run {args.run!r} is not a run directory (no config.json)")
  results = run_study(args)
  text = table(results)
  print(text)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
