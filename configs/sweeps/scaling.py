"""IsoFLOP grid for dense and MoE scaling laws (Chinchilla-style, plus MoE width/granularity).

Command (2-core CPU):
  python -m experiments.sweep --config configs/sweeps/scaling.py:tiny --workdir runs/scaling-tiny   # 48 runs, ~1.1 h quiet
  python tools/scaling_report.py --csv runs/scaling-tiny/results.csv --out docs/results/scaling \
      --max_starts 64 --bootstrap 100          # per-family fits, efficiency leverage, plot (~30 s)
  python -m experiments.sweep --config configs/sweeps/scaling.py --workdir runs/scaling            # 120 runs (accelerator)
  python tools/fit_scaling_laws.py --law chinchilla --csv runs/scaling-tiny/results.csv \
      --where "_family=='dense'" --out dense.json
What it measures: for each FLOP budget C, models of several widths trained
for C / (flops_per_token * tokens_per_step) steps (steps derived per point),
for a dense family and MoE families at the dense model's active FLOPs per
token: E experts of granularity G (E*G experts of width ffn/G, top_k = G,
so a token's expert compute equals the dense FFN's). Fit dense and MoE laws
on results.csv and compare them with the efficiency leverage
(moejax.scaling; `tools/scaling_report.py` does both).
Result of :tiny (docs/results/scaling.md): every MoE family below dense at
every budget; best validation loss at C=1e13 (nats/byte) dense 1.048,
E4-G1 1.007, E8-G1 0.994, E8-G2 0.961; efficiency leverage over dense from
the fits 1.3-1.4x (E4-G1), 1.5-1.7x (E8-G1), 1.9-2.5x (E8-G2). The isoFLOP
minima at 1e12 and 3e12 sit at the smallest width (not bracketed).
"""

from configs.quickstart import get_config
from experiments.sweep.grid import Sweep, apply, axis, derive, product
from moejax.model import flops_per_token

VARIANTS = {
    # widths, budgets (FLOPs), (E, G) MoE families
    "full": ((64, 96, 128, 192), (1e13, 3e13, 1e14),
             [(e, g) for e in (4, 8, 16) for g in (1, 2, 4)]),
    # 4 widths x 3 budgets per family: 12 points for a 5-parameter law.
    # Widths from 32: at these budgets the isoFLOP optimum sits at or below 48.
    "tiny": ((32, 48, 80, 128), (1e12, 3e12, 1e13), [(4, 1), (8, 1), (8, 2)]),
}
FFN_MULT = 4  # dense FFN width = FFN_MULT * d_model


def _family(e: int, g: int) -> dict:
  if e == 0:
    return {"family": "dense", "moe.enabled": False}
  # top-1 gates keep the raw softmax probability (Switch): a renormalised
  # single weight is always 1 and would give the router no LM-loss gradient.
  return {"family": f"moe-E{e}-G{g}", "moe.enabled": True, "moe.num_experts": e * g,
          "moe.top_k": g, "moe.topk.renormalize": g > 1, "moe.granularity": g}


def get_sweep(variant: str = "full") -> Sweep:
  if variant not in VARIANTS:
    raise ValueError(f"configs/sweeps/scaling.py:{variant}: allowed variants {sorted(VARIANTS)}")
  widths, budgets, moe = VARIANTS[variant]
  base = get_config("moe")
  base.name = f"scaling-{variant}"
  base.train.eval_batches = 8
  families = [_family(0, 1)] + [_family(e, g) for e, g in moe]
  grid = product([{k: v for k, v in f.items() if k not in ("family", "moe.granularity")}
                  | {"_family": f["family"], "_g": f.get("moe.granularity", 1)}
                  for f in families],
                 axis("model.d_model", widths), axis("_budget", budgets))

  def derived(p: dict) -> dict:
    d = p["model.d_model"]
    out = {"model.num_heads": max(2, d // 32), "model.ffn_hidden": FFN_MULT * d,
           "moe.expert_hidden": FFN_MULT * d // p["_g"]}
    cfg = apply(base, {**p, **out})
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    steps = max(20, round(p["_budget"] / (flops_per_token(cfg) * tokens_per_step)))
    out.update({"train.steps": steps, "train.warmup_steps": max(1, steps // 10),
                "train.eval_every": steps, "train.checkpoint_every": max(1, steps // 4),
                "name": f"{p['_family']}-d{d}-C{p['_budget']:.0e}"})
    return out

  points = [{k: v for k, v in p.items() if k != "_g"} for p in derive(grid, derived)]
  return Sweep(f"scaling-{variant}", base, points)
