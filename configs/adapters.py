"""Adapter experts: routed LoRA experts fine-tuning a frozen quickstart-dense base.

Each of the 4 layers gets LoRA experts (rank 8, top-2 of a linear router)
in parallel with its FFN; only they and their routers train (moejax/moe/
adapters.py). Variants differ only in how 16 LoRA experts are spread over
the layers: uniform (4,4,4,4), increasing with depth (2,3,5,6), decreasing
(6,5,3,2); `custom` takes --config.moe.adapters.experts_per_layer=...

Commands (2 cores; base from configs/upcycle.py:dense_base, ~1.5-3 min each):
  python -m experiments --config configs/adapters.py:uniform \
      --config.moe.adapters.base=runs/upcycling/dense --workdir runs/upcycling/lora_uniform
  python -m experiments --config configs/adapters.py:increasing \
      --config.moe.adapters.base=runs/upcycling/dense --workdir runs/upcycling/lora_increasing

Fine-tuning text: Vim's options.txt (/usr/share/vim/vim90/doc/options.txt,
413,816 bytes, sha256 078258dc...; any UTF-8 .txt works via --config.data.path),
technical English unlike the KJV the base saw.

What it reproduces: MoLA's question (Gao et al., 2024: do higher layers need
more LoRA experts?) at toy scale: equal total experts and trainable
parameters, different layer-wise allocation.

Expected result: docs/results/upcycling.md (both far below the frozen base's
loss on the new text; the allocation changes the loss by little at this scale).
"""

from configs.quickstart import get_config as quickstart

STEPS = 150
TEXT = "/usr/share/vim/vim90/doc/options.txt"
VARIANTS = ("uniform", "increasing", "decreasing", "custom")


def get_config(variant: str = "uniform"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/adapters.py:{variant}: unknown variant; allowed: {VARIANTS}")
  c = quickstart("dense")  # must match the base run's model (checked at startup)
  c.name = f"adapters-{variant}"
  c.data.path = TEXT
  c.data.val_fraction = 0.1
  c.train.steps = STEPS
  c.train.lr = 3e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.checkpoint_every = 50
  a = c.moe.adapters
  a.enabled = True
  a.allocation = variant
  a.num_experts = 4  # 16 in total over the 4 layers
  a.rank = 8
  a.alpha = 16.0
  a.top_k = 2
  if variant == "custom":
    a.experts_per_layer = "2,2,6,6"
  return c
