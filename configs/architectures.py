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


def _dense(c):
  """The dense baseline at the quickstart's active parameters per token: one FFN as wide as
  the k=2 routed experts of width 256 (configs/quickstart.py:dense)."""
  c.moe.enabled = False
  c.model.ffn_hidden = c.moe.top_k * c.moe.expert_hidden


def _moh(c):
  """Mixture-of-Head attention: of the 4 heads per layer 1 is shared and each token picks 2
  of the other 3 by its head router (75% of the heads, as MoH-LLaMA3); the FFN MoE is the
  quickstart's. Active parameters 1,089,664 vs the quickstart's 1,119,872 (per layer the
  unused head's Q and O slices, 2 * 128 * 32, are idle and the gates add 128 * 5);
  flops_per_token 6.93M vs 6.91M (+0.2%, the gates: every head is computed and weighted,
  an unused one by 0). docs/architectures.md, "Mixture-of-Head attention"."""
  c.model.moh.top_k = 2
  c.model.moh.shared_heads = 1


VARIANTS = {
    "dense": _dense,
    "topk": _topk,
    "moh": _moh,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
