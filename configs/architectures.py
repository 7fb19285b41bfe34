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


def _zero_experts(c):
  """Zero-computation experts (MoE++, LongCat-Flash): top-3 of 8 FFN + 4 zero-computation
  experts (2 zero, 1 copy, 1 constant), the budget bias holding a mean of 2.0 FFN experts
  per token.

  Active compute: the bias steers the measured mean FFN experts per token (summary.json
  `moe_experts_per_token`) to the quickstart's 2 experts of width 256; the zero, copy and
  constant experts cost O(d_model) per token. The counted active FLOPs are the nominal
  k = 3 choices, an upper bound. With 4 zero-computation choices beside 8 experts the switch
  balancing loss's uniform spread (an FFN share of 8/12) agrees with the target (2 of 3).
  """
  c.moe.router = "zero_experts"
  c.moe.top_k = 3
  z = c.moe.zero_experts
  z.zero, z.copy, z.constant = 2, 1, 1
  z.target = 2.0
  z.rate = 1e-2


def _chain(c):
  """Chain-of-Experts (Wang et al. 2025): 2 routing rounds of top-1 over the same 8 experts,
  each round with its own router.

  Active compute: 2 rounds x 1 expert of width 256 = the quickstart's top-2 per token (the
  paper's CoE-2(K/2) against a one-round top-K); the second router adds 8 * 128 parameters
  per MoE layer. Top-1 weights are the softmax probabilities (Switch: topk.renormalize=False;
  a renormalised single weight would always be 1).
  """
  c.moe.chain.rounds = 2
  c.moe.top_k = 1
  c.moe.topk.renormalize = False


VARIANTS = {
    "topk": _topk,
    "zero_experts": _zero_experts,
    "chain": _chain,
}


def get_config(name: str = "topk"):
  if name not in VARIANTS:
    raise ValueError(f"configs/architectures.py:{name}: unknown variant; allowed: "
                     f"{sorted(VARIANTS)}")
  c = quickstart("moe")
  c.name = f"arch-{name}"
  VARIANTS[name](c)
  return c
