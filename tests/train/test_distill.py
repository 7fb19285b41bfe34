"""Distillation in the trainer (moejax/train/distill.py): the KD loss against a NumPy
reference and its properties, the train step's loss and metrics with a teacher of another
config, micro-batches, the teacher outside the optimizer, and the train.distill.* checks."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.train import distill, trainer
from moejax.train import tokenizer as tok_lib
from moejax.train.optimizer import make_optimizer
from moejax.validation import validate
from tests.conftest import tiny_config


def kd_reference(student_BxLxV, teacher_BxLxV, temperature, weights_BxL=None) -> float:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), token by token in float64,
  (weighted) mean over tokens."""
  s = np.asarray(student_BxLxV, np.float64)
  t = np.asarray(teacher_BxLxV, np.float64)
  b, l, v = s.shape
  w = np.ones((b, l)) if weights_BxL is None else np.asarray(weights_BxL, np.float64)
  total = 0.0
  for i in range(b):
    for j in range(l):
      zs = s[i, j] / temperature
      zt = t[i, j] / temperature
      log_q = zs - (zs.max() + np.log(np.sum(np.exp(zs - zs.max()))))
      log_p = zt - (zt.max() + np.log(np.sum(np.exp(zt - zt.max()))))
      kl = 0.0
      for k in range(v):
        kl += np.exp(log_p[k]) * (log_p[k] - log_q[k])
      total += w[i, j] * kl
  return temperature ** 2 * total / w.sum()


def _logits(seed, shape=(2, 3, 11), scale=3.0):
  return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_kd_loss_matches_the_reference(temperature, weighted):
  s, t = _logits(0), _logits(1)
  w = np.random.default_rng(2).uniform(0.0, 1.0, s.shape[:2]).astype(np.float32) if weighted \
      else None
  got = float(distill.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature,
                              None if w is None else jnp.asarray(w)))
  np.testing.assert_allclose(got, kd_reference(s, t, temperature, w), rtol=2e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.2, 8.0),
       scale=st.floats(0.01, 10.0), v=st.integers(2, 9))
def test_kd_loss_properties(seed, temperature, scale, v):
  s, t = _logits(seed, (2, 3, v), scale), _logits(seed + 1, (2, 3, v), scale)
  kd = float(distill.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature))
  assert kd >= -1e-6 * temperature ** 2  # a KL divergence (up to float32 rounding)
  assert float(distill.kd_loss(jnp.asarray(s), jnp.asarray(s), temperature)) == 0.0
  # the T^2 convention: T^2 times the KL of the tempered distributions
  scaled = float(distill.kd_loss(jnp.asarray(s * temperature), jnp.asarray(t * temperature),
                                 temperature))
  plain = float(distill.kd_loss(jnp.asarray(s), jnp.asarray(t), 1.0))
  np.testing.assert_allclose(scaled, temperature ** 2 * plain, rtol=1e-3,
                             atol=1e-6 * temperature ** 2)


def test_combined_loss_convention():
  ce, kd = jnp.float32(2.0), jnp.float32(0.5)
  assert float(distill.combined_loss(ce, kd, 1.0)) == 0.5  # alpha = 1: pure distillation
  assert float(distill.combined_loss(ce, kd, 0.0)) == 2.0  # alpha = 0: the LM loss
  np.testing.assert_allclose(float(distill.combined_loss(ce, kd, 0.25)), 0.25 * 0.5 + 0.75 * 2)


# --------------------------------------------------------------------------- the train step


def _student(alpha=0.3, temperature=2.0, accum=1):
  cfg = tiny_config()
  cfg.train.distill.teacher = "teacher-run"  # make_train_step takes the loaded Teacher
  cfg.train.distill.alpha = alpha
  cfg.train.distill.temperature = temperature
  cfg.train.grad_accum_steps = accum
  cfg.train.warmup_steps = 0  # the first step updates the parameters
  return cfg


def _teacher() -> distill.Teacher:
  """Another config: 8 experts, the sigmoid_bias router (with its "moe_state" collection)."""
  tcfg = tiny_config(num_experts=8, router="sigmoid_bias")
  variables = lm.init(jax.random.key(5), tcfg)
  assert "moe_state" in variables
  return distill.Teacher("teacher-run", 0, tcfg, variables)


def _batch():
  ids = np.random.default_rng(3).integers(0, 258, (8, 17)).astype(np.int32)
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}


def _plain(cfg):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.train.distill.teacher = ""
  return c


def _step(cfg, teacher=None):
  tx = make_optimizer(cfg.train)
  state = trainer.init_state(cfg, tx)
  variables = {"params": state["params"], **state["collections"]}
  variables = jax.tree.map(np.array, variables)  # the step donates the state
  new_state, out = trainer.make_train_step(cfg, tx, None, teacher)(state, _batch())
  return variables, new_state, jax.device_get(out)


@pytest.fixture(scope="module")
def teacher():
  return _teacher()


def test_the_step_trains_on_the_distillation_loss(teacher):
  cfg = _student()
  variables, new_state, out = _step(cfg, teacher)
  _, plain_state, plain = _step(_plain(cfg))
  batch = _batch()
  s_logits, _ = lm.make_model(cfg, deterministic=True).apply(variables, batch["inputs"])
  t_logits, _ = lm.make_model(teacher.cfg, deterministic=True).apply(teacher.variables,
                                                                     batch["inputs"])
  want = kd_reference(s_logits, t_logits, 2.0)
  sc, pc = out["scalars"], plain["scalars"]
  np.testing.assert_allclose(sc["train/kd_loss"], want, rtol=1e-4)
  assert sc["train/loss"] == pc["train/loss"]  # train/loss stays the LM cross-entropy
  aux = pc["train/total_loss"] - pc["train/loss"]  # the auxiliary losses, as without teacher
  np.testing.assert_allclose(sc["train/total_loss"],
                             0.3 * want + 0.7 * pc["train/loss"] + aux, rtol=1e-5)
  assert "train/kd_loss" not in pc
  # the teacher is neither trained nor held in the optimizer: the state has the plain layout
  assert jax.tree.structure(new_state) == jax.tree.structure(plain_state)
  assert not np.allclose(new_state["params"]["embed"],
                         plain_state["params"]["embed"], atol=1e-6)


def test_alpha_zero_is_the_lm_step(teacher):
  _, _, out = _step(_student(alpha=0.0), teacher)
  _, _, plain = _step(_plain(_student(alpha=0.0)))
  sc, pc = out["scalars"], plain["scalars"]
  np.testing.assert_allclose(sc["train/total_loss"], pc["train/total_loss"], rtol=1e-6)
  np.testing.assert_allclose(sc["train/grad_norm"], pc["train/grad_norm"], rtol=1e-5)
  assert sc["train/kd_loss"] > 0.01  # measured, but weighted 0


def test_micro_batches_give_the_batch_kd_loss(teacher):
  _, _, out1 = _step(_student(), teacher)
  _, _, out2 = _step(_student(accum=2), teacher)
  for k in ("train/kd_loss", "train/loss"):
    np.testing.assert_allclose(out2["scalars"][k], out1["scalars"][k], rtol=1e-5)


def test_make_train_step_needs_the_teacher_exactly_when_configured(teacher):
  cfg = _student()
  tx = make_optimizer(cfg.train)
  with pytest.raises(ValueError, match="train.distill.teacher='teacher-run' and a teacher "
                                       "missing"):
    trainer.make_train_step(cfg, tx)
  with pytest.raises(ValueError, match="train.distill.teacher='' and a teacher given"):
    trainer.make_train_step(_plain(cfg), tx, None, teacher)


# --------------------------------------------------------------------------- config checks


def _config_run(root, name, cfg) -> str:
  """A directory the checks accept as a run: config.json and a checkpoints/ folder."""
  run = os.path.join(root, name)
  os.makedirs(os.path.join(run, "checkpoints"))
  trainer.write_config(cfg, run)
  return run


@pytest.mark.parametrize("key,value,words", [
    ("temperature", 0.0, ["train.distill.temperature=0.0", "> 0"]),
    ("temperature", -1.0, ["train.distill.temperature=-1.0", "> 0"]),
    ("temperature", float("inf"), ["train.distill.temperature=inf", "finite"]),
    ("alpha", 1.5, ["train.distill.alpha=1.5", "[0, 1]"]),
    ("alpha", -0.1, ["train.distill.alpha=-0.1", "[0, 1]"]),
    ("step", -2, ["train.distill.step=-2", "-1 (the newest)"]),
    ("step", 1.5, ["train.distill.step", "type int"]),
    ("teacher", 3, ["train.distill.teacher", "type str"]),
])
def test_bad_values_name_the_key(key, value, words):
  d = tiny_config().to_dict()
  d["train"]["distill"][key] = value
  with pytest.raises(ConfigError) as e:
    validate(ml_collections.ConfigDict(d))
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_teacher_runs_are_checked(tmp_path):
  root = str(tmp_path)
  cfg = tiny_config()
  cfg.train.distill.teacher = os.path.join(root, "nowhere")
  with pytest.raises(ConfigError, match="train.distill.teacher=.*nowhere.* must be a run "
                                        "directory"):
    validate(cfg)
  other = tiny_config(num_experts=8, router="sigmoid_bias")
  cfg.train.distill.teacher = _config_run(root, "other_moe", other)
  validate(cfg)  # another MoE config: fine
  wide = tiny_config()
  wide.model.vocab_size = 300
  cfg.train.distill.teacher = _config_run(root, "wide", wide)
  with pytest.raises(ConfigError, match=r"train.distill.teacher=.* that run has "
                                        r"model.vocab_size=300, this one 258"):
    validate(cfg)
  adapter = tiny_config()
  adapter.moe.adapters.enabled = True
  adapter.moe.adapters.base = root
  cfg.train.distill.teacher = _config_run(root, "adapter", adapter)
  with pytest.raises(ConfigError, match="adapter run"):
    validate(cfg)


def test_the_tokenizers_must_match(tmp_path):
  texts = ["In the beginning God created the heaven and the earth."] * 20
  tok_lib.train_bpe(texts, 300, tmp_path / "bpe")
  shutil.copytree(tmp_path / "bpe", tmp_path / "bpe_copy")
  student = tiny_config()
  student.model.vocab_size = 300
  teacher = ml_collections.ConfigDict(student.to_dict())
  teacher.data.tokenizer = str(tmp_path / "bpe")
  student.train.distill.teacher = _config_run(str(tmp_path), "bpe_teacher", teacher)
  with pytest.raises(ConfigError, match=r"that run has data.tokenizer=.*bpe', this one "
                                        r"'bytes', and they differ"):
    validate(student)
  student.data.tokenizer = str(tmp_path / "bpe_copy")  # the same vocabulary elsewhere
  validate(student)


def test_plain_configs_have_no_teacher():
  cfg = tiny_config()
  assert distill.settings(cfg) is None
  assert cfg.train.distill.to_dict() == {"teacher": "", "step": -1, "temperature": 1.0,
                                         "alpha": 1.0}


def test_load_teacher_reads_the_configured_step(tmp_path):
  tcfg = tiny_config(num_experts=8, router="sigmoid_bias")
  variables = lm.init(jax.random.key(5), tcfg)
  run = str(tmp_path / "teacher")
  trainer.write_run(tcfg, variables, run)
  cfg = tiny_config()
  cfg.parallel.data = 1
  cfg.train.distill.teacher = run
  t = distill.load_teacher(cfg)
  assert (t.run_dir, t.step, t.cfg.moe.num_experts) == (os.path.abspath(run), 0, 8)
  assert t.cfg.parallel.data == 1  # the student's mesh
  for a, b in zip(jax.tree.leaves(t.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  cfg.train.distill.step = 5
  with pytest.raises(ConfigError, match=r"train.distill.teacher=.* with "
                                        r"config key train.distill.step=5: checkpoint step 5"):
    distill.load_teacher(cfg)
