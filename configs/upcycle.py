"""From dense to MoE: sparse upcycling, its baselines, and growing experts.

All variants continue from (or compare against) a short quickstart-dense base
run and train for EXTRA_STEPS more steps with the same schedule (lr 1e-3,
20 warmup steps, cosine), so they differ only in where they start.

Commands (2 cores; the doc's numbers came from docs/results/upcycling.md):
  # the dense base: quickstart dense, 200 steps (~1.5-3 min)
  python -m experiments --config configs/upcycle.py:dense_base --workdir runs/upcycling/dense
  # (a) upcycled MoE, fine-grained split, zero router (starts at the dense function)
  python tools/upcycle.py --from runs/upcycling/dense --config configs/upcycle.py:split \
      --out runs/upcycling/upcycled
  python -m experiments --workdir runs/upcycling/upcycled            # EXTRA_STEPS (~2-4 min)
  # same MoE from scratch, and the dense model continued (warm start, same schedule)
  python -m experiments --config configs/upcycle.py:scratch --workdir runs/upcycling/scratch
  python -m experiments --config configs/upcycle.py:dense_continue \
      --config.init.from_dense=runs/upcycling/dense --workdir runs/upcycling/dense_continue
  # copies of the whole FFN (E=8 experts of width 512, k=2: twice the dense FFN compute)
  python tools/upcycle.py --from runs/upcycling/dense --config configs/upcycle.py:copy \
      --out runs/upcycling/upcycled_copy
  # attention experts too: `split` FFN experts + 4 attention experts (top-2, shared
  # K/V), each a copy of the dense layer's attention (init.upcycle_attention)
  python tools/upcycle.py --from runs/upcycling/dense --config configs/upcycle.py:copy_attn \
      --out runs/upcycling/upcycled_attn
  # growing: an E=8 MoE run -> E=16 (every expert twice, moe.topk.copies=2)
  python -m experiments --config configs/upcycle.py:grow \
      --config.init.grow_from=runs/upcycling/upcycled --workdir runs/upcycling/grown
  # growing by importance: E=8 -> 16, the 8 extra copies given out by each
  # expert's gradient (Taylor) importance on 4 training batches
  python -m experiments --config configs/upcycle.py:grow_importance \
      --config.init.grow_from=runs/upcycling/upcycled --workdir runs/upcycling/grown_importance
  # the no-growth baseline: the same E=8 run continued (grow_factor=1, same schedule)
  python -m experiments --config configs/upcycle.py:grow_none \
      --config.init.grow_from=runs/upcycling/upcycled --workdir runs/upcycling/grown_none

What it reproduces: the sparse-upcycling setup of Komatsuzaki et al. (2023)
at toy scale: the upcycled MoE starts exactly at the dense model's loss
(upcycle_check.json: equal for `split` with the zero router and for `copy`
with any router), far ahead of the same MoE from scratch; whether it beats
simply continuing the dense model depends on the budget.

Expected result (docs/results/upcycling.md, 150 extra steps on a 200-step
base, ~3-5 min each under load): validation loss upcycled (split) 1.248 vs
continued dense 1.233 vs scratch 1.608 nats (equal active compute; at this
short budget the continued dense model is ahead); upcycled (copy) 1.199, at
1.7x the FLOPs per token; copy_attn (split + 4 top-2 attention experts)
1.252, ~2 min quiet.
"""

from configs.quickstart import get_config as quickstart

BASE_STEPS = 200
EXTRA_STEPS = 150
VARIANTS = ("dense_base", "split", "copy", "copy_attn", "scratch", "dense_continue", "grow",
            "grow_importance", "grow_none")


def _extra(c):
  c.train.steps = EXTRA_STEPS
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  return c


def get_config(variant: str = "split"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/upcycle.py:{variant}: unknown variant; allowed: {VARIANTS}")
  if variant == "dense_base":
    c = quickstart("dense")  # FFN width 512 = top_k * expert_hidden of the quickstart MoE
    c.name = "upcycle-dense_base"
    c.train.steps = BASE_STEPS
    c.train.warmup_steps = 50
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
  if variant == "dense_continue":
    c = _extra(quickstart("dense"))  # init.from_dense on a dense config: a warm start
  else:
    c = _extra(quickstart("moe"))  # E=8, k=2, expert_hidden=256: dense-matched compute
  c.name = f"upcycle-{variant}"
  if variant == "split":  # 512 = 2 slices of 256; 4 copies of each; k=2 = one per slice
    c.init.upcycle = "split"
    c.init.router = "zero"
  elif variant == "copy_attn":  # `split` + attention experts copied from the dense attention
    c.init.upcycle = "split"
    c.init.router = "zero"
    c.model.attn_experts = 4
    c.model.attn_top_k = 2  # 2 copies with weights summing to 1: still the dense output
    c.model.attn_shared_kv = True
    c.init.upcycle_attention = True
  elif variant == "copy":  # experts are whole copies of the dense FFN
    c.moe.expert_hidden = 512
    c.init.upcycle = "copy"
  elif variant == "grow":  # from an E=8 topk run: 16 experts, one of each pair per token
    c.moe.num_experts = 16
    c.moe.topk.copies = 2
    c.init.grow_factor = 2
    c.init.grow_noise = 1e-3
  elif variant == "grow_none":  # the no-growth baseline: the E=8 run warm-started
    c.init.grow_factor = 1
    c.init.grow_noise = 1e-3
  elif variant == "grow_importance":  # same size, extra copies where the loss gradient says
    c.moe.num_experts = 16
    c.moe.topk.grown_groups = 8
    c.init.grow_select = "importance"
    c.init.grow_batches = 4
    c.init.grow_noise = 1e-3
  return c
