"""Expert and layer architectures at the quickstart's size (docs/architectures.md).

Command (one variant; ~3-5 minutes on 2 cores at the quickstart's 600 steps):
  python -m experiments --config configs/architectures.py:NAME

What it reproduces: each architecture of docs/architectures.md trained on the
default corpus (byte-level KJV) with the quickstart's model, data and steps,
at the quickstart's active expert compute per token (2 of 8 experts of width
256) unless the variant's comment says how it differs.
Expected result: docs/results/architectures.md (3 seeds at 300 steps, the
sweep's `short` setting).
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


def _mole(c):
  """Mixture of Latent Experts (moejax/moe/experts/latent.py): the quickstart's 8 experts of
  width 256, top-2, their gate / up projections through shared [128, 64] latent projections
  (rank 64 = d_model / 2). Fewer parameters at the same routing: routed experts 540,672 per
  layer vs 786,432 (0.69x), model total 2.50M vs 3.48M (0.72x); active parameters per token
  0.92M vs 1.12M (0.82x) and training FLOPs per token 6.13M vs 6.91M (0.89x; the shared
  projection is computed for each of a token's 2 experts)."""
  c.moe.expert = "latent"
  c.moe.latent.rank = 64


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


def _schedule(c):
  """Pyramid-residual-style layer-wise schedule (DeepSpeed-MoE's PR-MoE pyramid; DynaMoE's
  layer-wise capacity): experts per MoE layer 4, 4, 8, 8 (moe.num_experts=8 the widest),
  top-2 everywhere. The active expert compute of topk (2 experts of width 256 per token and
  layer) with 24 routed experts instead of 32: 2.69M instead of 3.48M total parameters
  (77%), 1.12M active in both (the two 4-expert routers are 1,024 parameters smaller)."""
  c.moe.layer_schedule.kind = "pyramid"
  c.moe.layer_schedule.min_experts = 4


VARIANTS = {
    "dense": _dense,
    "topk": _topk,
    "moh": _moh,
    "zero_experts": _zero_experts,
    "chain": _chain,
    "mole": _mole,
    "unipool": _unipool,
    "rexmoe": _rexmoe,
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
