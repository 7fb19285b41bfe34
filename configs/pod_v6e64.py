"""A 9.3B-parameter (0.47B active) byte-level MoE LM for a TPU v6e-64 slice (8 x 8 chips).

Launch as configs/pod_v5e64.py, with this file:
  python -m experiments.launch --tpu NAME --zone ZONE -- \\
      --config configs/pod_v6e64.py --workdir runs/pod-v6e64 --config.data.path=/data/corpus
`:smoke` runs the same model for 100 steps on the bundled Bible.

What it trains: 20 layers, d_model 1536, 12 heads of 128, every FFN an MoE
of 64 experts (hidden 1536, top-2), global-batch balancing, bfloat16
compute, rematerialised layers; 512 sequences of 2048 bytes (1.05M tokens)
per step, 20K steps = 21B tokens. Mesh: fsdp=8 x expert=8 over the 8 x 8
chips (each mesh axis one physical axis of the torus); every chip holds 8
experts' weights split over fsdp (1/64 of the 9.1B expert parameters) and
1/8 of the rest, and 8 sequences of the batch.

Compiled for its slice on a CPU host (tools/aot_compile.py, libtpu 0.0.42.1,
2-core CPU VM shared with other jobs, 2026-12-07; docs/tpu.md has the table):
  python tools/aot_compile.py --config configs/pod_v6e64.py --topology v6e:8x8
(needs libtpu: pip install -e '.[tpu]'). v6e:8x8: fits, 19.24 GiB per chip
of the 31.25 the compiler allows (12.01 GiB, 38%, headroom): 1.85 GiB state
and batch, 17.29 GiB temporaries; ragged_all_to_all exchange. Compile 494 s
(lowering 2 s), 4.9 GB RSS. FLOPs per step: 3.38e15 (52.8 TFLOP per chip,
moejax.model.flops_per_token), 58 ms per step at the v6e's bf16 peak.
Its mesh has no layout on a v5p-64 (4x4x4: an axis of 8 is no product of
its 4s); `--config.parallel.fsdp=4 --config.parallel.expert=16` lays out
there (not compiled). Throughput has not been measured on a TPU.
"""

from moejax.config import default_config

TOPOLOGY = "v6e:8x8"  # the slice it is laid out for (tools/aot_compile.py --topology)
VARIANTS = {"moe": 20_000, "smoke": 100}


def get_config(variant: str = "moe"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/pod_v6e64.py:{variant}: unknown variant; allowed: "
                     f"{', '.join(VARIANTS)}")
  steps = VARIANTS[variant]
  c = default_config()
  c.name = f"pod-v6e64-{variant}"
  c.model.d_model = 1536
  c.model.num_layers = 20
  c.model.num_heads = 12
  c.model.ffn_hidden = 6144  # used only by dense layers (none here)
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.moe.num_experts = 64
  c.moe.top_k = 2
  c.moe.expert_hidden = 1536
  c.moe.balance = "global_batch"
  c.train.steps = steps
  c.train.batch_size = 512
  c.train.seq_len = 2048
  c.train.lr = 3e-4
  c.train.warmup_steps = min(1000, steps // 10)
  c.train.log_every = 10
  c.train.eval_every = min(1000, steps)
  c.train.eval_batches = 8
  c.train.checkpoint_every = min(1000, steps)
  c.parallel.data = -1  # 1 on 64 chips
  c.parallel.fsdp = 8
  c.parallel.expert = 8
  return c
