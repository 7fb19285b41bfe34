"""Expert and layer architectures at the quickstart's size (docs/architectures.md).

Command (one variant; ~3-5 minutes on 2 cores at the quickstart's 600 steps):
  python -m experiments --config configs/architectures.py:NAME

What it reproduces: each architecture of docs/architectures.md trained on the
default corpus (byte-level KJV) with the quickstart's model, data and steps,
at the quickstart's active expert compute per token (2 of 8 experts of width
256) unless the variant's comment says how it differs.
Expected result: docs/results/architectures.md.
"""

from configs.quickstart import get_config as quickstart


def _topk(c):
  """The quickstart's top-k MoE itself (the comparison's reference row)."""
  del c


def _schedule(c):
  """Pyramid-residual-style layer-wise schedule (DeepSpeed-MoE's PR-MoE pyramid; DynaMoE's
  layer-wise capacity): experts per MoE layer 4, 4, 8, 8 (moe.num_experts=8 the widest),
  top-2 everywhere. The active expert compute of topk (2 experts of width 256 per token and
  layer) with 24 routed experts instead of 32: 2.69M instead of 3.48M total parameters
  (77%), 1.12M active in both (the two 4-expert routers are 1,024 parameters smaller)."""
  c.moe.layer_schedule.kind = "pyramid"
  c.moe.layer_schedule.min_experts = 4


VARIANTS = {
    "topk": _topk,
    "schedule": _schedule,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
