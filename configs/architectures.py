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


def _mole(c):
  """Mixture of Latent Experts (moejax/moe/experts/latent.py): the quickstart's 8 experts of
  width 256, top-2, their gate / up projections through shared [128, 64] latent projections
  (rank 64 = d_model / 2). Fewer parameters at the same routing: routed experts 540,672 per
  layer vs 786,432 (0.69x), model total 2.50M vs 3.48M (0.72x); active parameters per token
  0.92M vs 1.12M (0.82x) and training FLOPs per token 6.13M vs 6.91M (0.89x; the shared
  projection is computed for each of a token's 2 experts)."""
  c.moe.expert = "latent"
  c.moe.latent.rank = 64


VARIANTS = {
    "topk": _topk,
    "mole": _mole,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
