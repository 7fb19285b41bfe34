"""The E=32 model whose routing traces feed the offloading and placement studies.

Command (~5-6 minutes on 2 cores, including compilation):
  python -m experiments --config configs/inference.py --workdir runs/e32
then, for the traces and tables of docs/inference.md:
  python tools/generate.py --run runs/e32 --prompts PROMPTS.jsonl --max-new-tokens 256 \
      --trace runs/e32/gen_trace.npz
  python tools/capture_trace.py --run runs/e32 --out runs/e32/val_trace.npz
  python tools/simulate_offload.py --trace runs/e32/val_trace.npz --json runs/e32/offload.json
  python tools/simulate_placement.py --trace runs/e32/val_trace.npz --devices 4 --replicas 4

What it is: the quickstart (configs/quickstart.py) with fine-grained experts at
the same active compute per token: 32 experts of width 128, 4 per token
(4 x 128 = 2 x 256 hidden units active), so a cache of C experts holds a
smaller share of the layer than with 8 experts and caching policies differ
more. Same data, steps and schedule as the quickstart.

Expected result (one seed, 2026-12-07, 305 s of training on the 2-core VM):
validation 1.496 bits per byte against the quickstart's 1.512; the
simulator tables are in docs/inference.md.
"""

from configs.quickstart import get_config as quickstart


def get_config(variant: str = "e32"):
  if variant != "e32":
    raise ValueError(f"configs/inference.py:{variant}: unknown variant; allowed: e32")
  c = quickstart("moe")
  c.name = "inference-e32"
  c.moe.num_experts = 32
  c.moe.top_k = 4
  c.moe.expert_hidden = 128
  return c
