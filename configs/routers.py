"""Every router at the quickstart's active FLOPs per token (E=8 experts, k=2 of width 256).

Command (one router; ~3.5 minutes on 2 cores at the quickstart's 600 steps):
  python -m experiments --config configs/routers.py:expert_choice
All of them: `python -m experiments.sweep --config configs/sweeps/routers.py --workdir runs/routers`.

What it reproduces: a like-for-like comparison of routing algorithms on the
default corpus (byte-level KJV): same model, data, steps and, per token, the
same expected expert compute (2 of 8 experts of width 256) as the quickstart.
How each router meets that budget:
  topk, topk_noisy, sigmoid_bias, recurrent, hash, group_limited(_balanced):
      exactly k=2 experts per token;
  expert_choice: capacity factor 1 -> E*C = k*B slots per position group, so
      2 experts per token on average;
  soft: slots_per_expert = k*B/E = 8, so every position group of B=32 tokens
      gets 2*32 expert slots (2 expert applications per token on average);
  relu: the adaptive L1 drives the active fraction to k/E (2 experts/token);
  top_p: p=0.5, at most 4 experts; null_experts: 8 null experts with k=2,
      so a token uses at most 2 real experts (at most the budget; AdaMoE's
      point is to spend less);
  thor: k=2 uniformly random experts per token in each forward pass, so a
      pass has the quickstart's active parameters; but a training step runs
      two passes (the consistency loss), so flops_per_token is twice the
      quickstart's, and evaluation with moe.thor.inference="average" runs
      all 8 experts per token (4x the expert compute; "single" runs 1);
  tsallis: topk plus the Tsallis router-entropy loss (q=1.1, weight 0.01,
      minimised): exactly k=2 experts per token, the loss costs nothing
      per token;
  erc: topk plus the ERC loss (weight 0.01, alpha 1, noise cap 1): exactly
      k=2 experts per token; the loss adds 8 x 8 proxy activations of the
      gate projection per MoE layer and step, independent of the batch.
Expected result: docs/results/routers.md (validation loss within a few
percent of each other at this scale; hash last, soft and expert choice
mixing across the batch).

Balancing variants (not in the routers sweep; docs/routers.md, "Balancing by
the assignment problem's dual"), all without a balancing loss, k=2 experts
per token:
  bip: q solved on every batch (4 dual iterations; not causal);
  bip_causal: routed with the q solved on the previous steps' batches;
  alf_decay: sigmoid_bias with the decaying step rate / sqrt(n), rate 1e-2
      (10x the constant default's first steps, 0.4x by step 600);
      compare with `sigmoid_bias` (constant rate 1e-3) on moe/layer*/load_cv.

Routing-dynamics variants (schedules stepped by the trainer, moejax/schedules.py;
docs/routers.md, "Routing on a schedule"):
  smoe_dropout: a frozen random router, active experts ramped 1 -> 2 over the
      first 300 steps (k_end = top_k = 2, the budget); no balancing or z-loss
      (a frozen router gets no gradient from them). Score it at several k:
      python tools/evaluate.py --run RUN --data FILE.jsonl --k 1,2
  dts: the dense-to-sparse gate, temperature 2 -> 0.3 (exponential) over the
      first 300 steps, then top-2. While annealing a token uses every expert
      whose gate weight is >= 1e-3 (all 8 at first), so the first half costs
      up to 4x the expert compute; flops_per_token counts all 8 experts.
"""

from configs.quickstart import get_config as quickstart

ROUTERS = ("topk", "topk_noisy", "expert_choice", "soft", "sigmoid_bias", "group_limited",
           "group_limited_balanced", "recurrent", "relu", "null_experts", "top_p", "hash",
           "thor", "tsallis", "erc")
BALANCING = ("bip", "bip_causal", "alf_decay")
DYNAMICS = ("smoe_dropout", "dts")


def get_config(name: str = "topk"):
  if name not in ROUTERS + BALANCING + DYNAMICS:
    raise ValueError(f"configs/routers.py:{name}: unknown router variant; allowed: "
                     f"{ROUTERS + BALANCING + DYNAMICS}")
  c = quickstart("moe")
  c.name = f"router-{name}"
  m = c.moe
  m.router = name
  if name == "topk_noisy":
    m.router = "topk"
    m.topk.noise = "gaussian"
  elif name == "expert_choice":
    m.capacity_factor = 1.0
  elif name == "soft":
    m.soft.slots_per_expert = m.top_k * c.train.batch_size // m.num_experts
  elif name == "sigmoid_bias":
    m.aux_loss_weight = 0.0  # auxiliary-loss-free: the bias balances the load
  elif name == "group_limited":
    m.group_limited.num_groups = 4
    m.group_limited.top_groups = 2
  elif name == "group_limited_balanced":
    m.router = "group_limited"
    m.group_limited.num_groups = 2
    m.group_limited.mode = "balanced"
  elif name == "null_experts":
    m.null_experts.num_null = 8
  elif name == "top_p":
    m.top_p.p = 0.5
    m.top_p.max_k = 4
  elif name in ("bip", "bip_causal"):
    m.aux_loss_weight = 0.0  # the dual offsets q balance the load
  elif name == "alf_decay":
    m.router = "sigmoid_bias"
    m.aux_loss_weight = 0.0
    m.sigmoid_bias.schedule = "inv_sqrt"
    m.sigmoid_bias.rate = 1e-2
  elif name == "hash":
    m.aux_loss_weight = 0.0  # nothing to balance: the hash fixes the routing
    m.z_loss_weight = 0.0
  elif name == "thor":
    m.aux_loss_weight = 0.0  # no router scores: nothing to balance
    m.z_loss_weight = 0.0
  elif name == "smoe_dropout":
    m.aux_loss_weight = 0.0  # the frozen router learns nothing from a balancing loss
    m.z_loss_weight = 0.0
    m.smoe_dropout.update(k_start=1, k_end=m.top_k, ramp_begin=0,
                          ramp_stop=c.train.steps // 2)
  elif name == "dts":
    m.dts.update(temperature_start=2.0, temperature_end=0.3, anneal_begin=0,
                 anneal_stop=c.train.steps // 2, anneal_shape="exponential",
                 threshold=1e-3)
  elif name == "tsallis":
    m.router = "topk"
    m.router_entropy.kind = "tsallis"
    m.router_entropy.q = 1.1
    m.router_entropy.weight = 0.01
  elif name == "erc":
    m.router = "topk"
    m.erc.weight = 0.01
    m.erc.alpha = 1.0
    m.erc.noise = 1.0
  return c
