"""Quickstart: a 4-layer byte-level MoE LM (E=8, k=2) on the King James Bible.

Command (2-core CPU, ~2-4 minutes including compilation):
  python -m experiments                                  # MoE, into runs/quickstart-moe-<time>
  python -m experiments --config configs/quickstart.py:dense   # dense baseline

What it reproduces: the classic MoE result at toy scale: at matched active
parameters per token (the dense FFN is top_k * expert_hidden wide), the MoE
with 8 experts (3.1x the total parameters) reaches a lower validation loss
for the same steps and tokens.

Expected result (recorded in README.md): validation loss of the MoE below
2.5 bits per byte and below the dense baseline's.
"""

from moejax.config import default_config


def get_config(variant: str = "moe"):
  c = default_config()
  c.name = f"quickstart-{variant}"
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.dtype = "bfloat16"
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.expert_hidden = 256
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  if variant == "dense":
    # Same active parameters per token: one FFN as wide as the k routed experts.
    c.moe.enabled = False
    c.model.ffn_hidden = c.moe.top_k * c.moe.expert_hidden
  elif variant != "moe":
    raise ValueError(f"configs/quickstart.py:{variant}: unknown variant; allowed: moe, dense")
  return c
