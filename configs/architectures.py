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


VARIANTS = {
    "topk": _topk,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
