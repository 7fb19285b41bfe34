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


def _unipool(c):
  """UniPool: one global pool of 16 experts (half the quickstart's 4 x 8) that every MoE
  layer's router scores. Total parameters 1,910,400 vs the quickstart's 3,479,168 (16
  experts of 98,304 fewer, 4 x 128 x 8 router weights more: each router scores 16);
  active per token 1,123,968 vs 1,119,872 (2 experts of width 256 per layer, as in the
  quickstart, plus those router weights)."""
  c.moe.pool.kind = "global"
  c.moe.pool.size = 16


def _rexmoe(c):
  """ReXMoE: the quickstart's 4 x 8 experts in one pool; each MoE layer routes over the 16
  experts of a window of 2 layers (itself and the next; the last layer the previous).
  Total parameters 3,483,264 vs the quickstart's 3,479,168 (4 x 128 x 8 more router
  weights: 16 choices per router); active per token 1,123,968 vs 1,119,872 (the same 2
  experts of width 256 per layer, plus those router weights)."""
  c.moe.pool.kind = "window"
  c.moe.pool.window = 2


VARIANTS = {
    "topk": _topk,
    "unipool": _unipool,
    "rexmoe": _rexmoe,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
