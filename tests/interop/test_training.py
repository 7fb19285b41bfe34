"""A converted checkpoint is an ordinary run directory: it trains, resumes exactly, exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from tests.conftest import REPO
from tests.interop.hf_models import VOCAB, make_model, run, transformers
from moejax import interop
from moejax.init.sources import run_config
from moejax.train import trainer

TRAIN = {"train.steps": 4, "train.batch_size": 4, "train.seq_len": 16, "train.warmup_steps": 1,
         "train.checkpoint_every": 2, "train.eval_every": 2, "train.eval_batches": 1,
         "train.log_every": 1}


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_converted_model_trains_and_resumes_exactly(tmp_path):
  model = make_model("deepseek_v3", num_key_value_heads=4, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                     kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                     v_head_dim=8, n_group=2, topk_group=1, first_k_dense_replace=1)
  hf_dir, full = str(tmp_path / "hf"), str(tmp_path / "full")
  model.save_pretrained(hf_dir)
  interop.from_hf(hf_dir, full, TRAIN)
  cfg = run_config(full)
  summary = trainer.train(cfg, full)
  assert summary["steps"] == 4 and np.isfinite(summary["final_val_loss"])
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  os.remove(os.path.join(resumed, "summary.json"))
  again = trainer.train(cfg, resumed)
  assert _losses(resumed) == _losses(full)  # bit for bit, steps 3-4 rewritten
  assert again["final_val_loss"] == summary["final_val_loss"]
  # the trained router bias (moe_state) and weights export and load in transformers
  out = str(tmp_path / "out")
  interop.to_hf(full, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  logits, _ = run(back, np.zeros((1, 5), np.int64))
  assert np.isfinite(logits).all()


def test_cli_from_hf_then_experiments_then_to_hf(tmp_path):
  hf_dir, run_dir, out = (str(tmp_path / n) for n in ("hf", "run", "out"))
  make_model("llama").save_pretrained(hf_dir)
  sets = [a for k, v in TRAIN.items() if k != "train.steps" for a in ("--set", f"{k}={v}")]
  tool = os.path.join(REPO, "tools", "convert.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, tool, "from-hf", hf_dir, run_dir, *sets], check=True, env=env)
  subprocess.run([sys.executable, "-m", "experiments", "--workdir", run_dir,
                  "--config.train.steps=2"], check=True, cwd=REPO, env=env)
  assert sorted(_losses(run_dir)) == [1, 2]
  subprocess.run([sys.executable, tool, "to-hf", run_dir, out], check=True, env=env)
  back = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert back.config.model_type == "llama" and back.config.vocab_size == VOCAB
  bad = subprocess.run([sys.executable, tool, "from-hf", "meta-llama/Llama-3-8B",
                        str(tmp_path / "x")], capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "huggingface-cli download meta-llama/Llama-3-8B" in bad.stderr
