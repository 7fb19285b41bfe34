"""A 3.3B-parameter (170M active) byte-level MoE LM for a TPU v5e-64 pod slice (16 hosts x 4 chips).

Launch (from a checkout whose `origin` the workers can clone; or add --copy):
  python -m experiments.launch --tpu NAME --zone ZONE -- \\
      --config configs/pod_v5e64.py --workdir runs/pod-v5e64 --config.data.path=/data/corpus
  python -m experiments.launch --tpu NAME --zone ZONE --stop   # SIGTERM: checkpoint and exit
`:smoke` runs the same model for 100 steps on the bundled Bible, to check the
pod, the install and the mesh before a long run.

What it trains: 16 layers, d_model 1024, 8 heads of 128, every FFN an MoE of
64 experts (hidden 1024, top-2, so each token's expert compute is one
2048-wide SwiGLU), global-batch balancing, bfloat16 compute; 512 sequences
of 1024 bytes (524K tokens) per step, 20K steps = 10.5B tokens. Mesh:
expert=16 (4 experts per chip: 3.2B expert parameters / 16 = 200M per chip,
3.2 GB with AdamW state), data=4; the batch is split over all 64 chips
(8 sequences each).

Data: `data.path` must name a UTF-8 text file or directory present on every
worker (each host reads its own shard). The default corpus, the 4 MB KJV
Bible, is what `:smoke` uses; for the full run it would be repeated ~2,500
times, so the default variant is only meaningful with a real corpus.

Compiled for its slice on a CPU host (tools/aot_compile.py, libtpu 0.0.42.1,
2-core CPU VM shared with other jobs, 2026-12-07; docs/tpu.md has the table):
  python tools/aot_compile.py --config configs/pod_v5e64.py --topology v5e:8x8
- v5e:8x8: fits, 13.69 GiB per chip of the 15.75 the compiler allows (2.06
  GiB, 13%, headroom): 3.02 GiB state and batch, 10.59 GiB temporaries. The
  dropless exchange is the padded all_to_all: the TPU compiler refuses
  ragged_all_to_all on v5e slices above 16 chips, and the trainer picks the
  padded one there. Compile 266-292 s (lowering 3 s), 3.1 GB RSS.
- v5p:4x4x4 (`--topology v5p:4x4x4`, same mesh, ragged exchange): fits,
  13.19 GiB of 95.74 (82.55 GiB headroom); compile 240 s.
FLOPs per step: 5.85e14 (9.14 TFLOP per chip; moejax.model.flops_per_token,
1.1 GFLOP per token), 46 ms per step at the v5e's bf16 peak (20 ms on a
v5p). Throughput has not been measured on a TPU. Layers are
rematerialised: without it neither slice fits (`--config.model.remat=False`:
134 GiB of temporaries per chip on v5e:8x8, 118 GiB on v5p:4x4x4).
"""

from moejax.config import default_config

TOPOLOGY = "v5e:8x8"  # the slice it is laid out for (tools/aot_compile.py --topology)
VARIANTS = {"moe": 20_000, "smoke": 100}


def get_config(variant: str = "moe"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/pod_v5e64.py:{variant}: unknown variant; allowed: "
                     f"{', '.join(VARIANTS)}")
  steps = VARIANTS[variant]
  c = default_config()
  c.name = f"pod-v5e64-{variant}"
  c.model.d_model = 1024
  c.model.num_layers = 16
  c.model.num_heads = 8
  c.model.ffn_hidden = 4096  # used only by dense layers (none here)
  c.model.dtype = "bfloat16"
  c.model.remat = True  # without it: 134 GiB of temporaries per chip on v5e:8x8 (docstring)
  c.moe.num_experts = 64
  c.moe.top_k = 2
  c.moe.expert_hidden = 1024
  c.moe.balance = "global_batch"
  c.train.steps = steps
  c.train.batch_size = 512
  c.train.seq_len = 1024
  c.train.lr = 4e-4
  c.train.warmup_steps = min(1000, steps // 10)
  c.train.log_every = 10
  c.train.eval_every = min(1000, steps)
  c.train.eval_batches = 8
  c.train.checkpoint_every = min(1000, steps)
  c.parallel.data = -1  # 4 on 64 chips
  c.parallel.fsdp = 1
  c.parallel.expert = 16
  return c
