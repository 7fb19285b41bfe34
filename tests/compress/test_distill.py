"""tools/compress.py --method distill: a pruned copy of a run, distilled from it, gets closer
to it; the result is an ordinary run that `python -m experiments` resumes; the teacher stays
out of its checkpoint; bad options exit 2 naming the option."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import model as lm
from moejax.compress import distill
from moejax.init.sources import load_run, run_config
from moejax.train import trainer
from moejax.train.preemption import StopRequest
from tests.conftest import REPO, assert_exits_2, load_tool, tiny_config
from tests.train.test_distill import kd_reference

compress_tool = load_tool("compress")
STEPS = 6
STATE_KEYS = {"step", "params", "opt_state", "collections", "wall_seconds", "bad_steps",
              "skipped_steps"}


def _teacher_config():
  cfg = tiny_config()
  cfg.train.steps = 20
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 1
  cfg.train.eval_every = 1000  # eval at the end only
  cfg.train.eval_batches = 1
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
  """teacher (E=4, trained for 20 steps: sharper than at init), pruned (E=2, the tool's
  prune), out (the pruned run distilled from the teacher by the tool)."""
  root = tmp_path_factory.mktemp("distill")
  teacher, pruned, out = (str(root / n) for n in ("teacher", "pruned", "out"))
  cfg = _teacher_config()
  trainer.train(cfg, teacher)
  assert compress_tool.main(["--run", teacher, "--method", "prune", "--criterion", "random",
                             "--remove", "0.5", "--out", pruned]) == 0
  assert compress_tool.main(["--run", pruned, "--method", "distill", "--teacher", teacher,
                             "--steps", str(STEPS), "--temperature", "2", "--alpha", "0.9",
                             "--out", out]) == 0
  return {"teacher": teacher, "pruned": pruned, "out": out}


def _variables(run):
  params, collections, _ = load_run(run)
  return {"params": params, **collections}


def _rows(run):
  with open(os.path.join(run, "metrics.jsonl")) as f:
    return [json.loads(ln) for ln in f]


def test_distillation_gets_closer_to_the_teacher(runs):
  report = json.load(open(os.path.join(runs["out"], "compress.json")))["steps"]
  assert [e["method"] for e in report] == ["prune", "distill"]
  entry = report[1]
  assert entry["teacher"] == os.path.abspath(runs["teacher"]) and entry["teacher_step"] == 20
  assert (entry["temperature"], entry["alpha"], entry["steps"]) == (2.0, 0.9, STEPS)
  assert entry["lr"] == pytest.approx(1e-3) and entry["warmup_steps"] == 0  # the defaults
  assert entry["finished"] and entry["trained_steps"] == STEPS
  assert entry["source_run"] == os.path.abspath(runs["pruned"])
  # the KD term on the validation batches, against the NumPy reference
  cfg, tcfg = run_config(runs["out"]), run_config(runs["teacher"])
  val = trainer.prepare(cfg).val_batches(cfg.train.batch_size, cfg.train.eval_batches)
  t_vars = _variables(runs["teacher"])

  def reference(run):
    s_vars, kd, nll = _variables(run), [], []
    for b in val:
      s, _ = lm.make_model(cfg, deterministic=True).apply(s_vars, b["inputs"])
      t, _ = lm.make_model(tcfg, deterministic=True).apply(t_vars, b["inputs"])
      kd.append(kd_reference(s, t, 2.0))
      s64 = np.asarray(s, np.float64)
      logz = np.log(np.exp(s64 - s64.max(-1, keepdims=True)).sum(-1)) + s64.max(-1)
      nll.append(np.mean(logz - np.take_along_axis(s64, b["targets"][..., None], -1)[..., 0]))
    return float(np.mean(kd)), float(np.mean(nll))

  kd_before, nll_before = reference(runs["pruned"])
  kd_after, nll_after = reference(runs["out"])
  np.testing.assert_allclose(entry["val_kd_loss_before"], kd_before, rtol=1e-4)
  np.testing.assert_allclose(entry["val_kd_loss_after"], kd_after, rtol=1e-4)
  np.testing.assert_allclose(entry["val_loss_before"], nll_before, rtol=1e-5)
  np.testing.assert_allclose(entry["val_loss_after"], nll_after, rtol=1e-5)
  assert kd_after < 0.9 * kd_before  # closer to the teacher
  summary = json.load(open(os.path.join(runs["out"], "summary.json")))
  assert summary["final_val_bpb"] == entry["val_bpb_after"]
  assert summary["distill_teacher"] == entry["teacher"]
  kd_rows = [r["train/kd_loss"] for r in _rows(runs["out"]) if "train/kd_loss" in r]
  assert len(kd_rows) == STEPS and all(np.isfinite(kd_rows))


def test_the_run_is_ordinary_and_the_teacher_is_not_in_its_checkpoint(runs):
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  cfg = run_config(runs["out"])
  assert cfg.train.steps == STEPS and cfg.moe.num_experts == 2
  assert cfg.train.distill.to_dict() == {"teacher": os.path.abspath(runs["teacher"]),
                                         "step": 20, "temperature": 2.0, "alpha": 0.9}
  assert sorted(os.listdir(os.path.join(runs["out"], "checkpoints"))) == ["2", "4", "6"]
  tree = ocp.PyTreeCheckpointHandler().metadata(
      epath.Path(runs["out"]) / "checkpoints" / "6" / "state").tree
  assert set(tree) == STATE_KEYS
  shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)  # noqa: E731
  student = lm.init(jax.random.key(0), cfg)["params"]
  assert shapes(tree["params"]) == shapes(student)
  # nothing of the 4-expert teacher (router [layers, D, 4]) anywhere in the state
  stored = set(jax.tree.leaves(shapes(tree), is_leaf=lambda x: isinstance(x, tuple)))
  teacher_only = set(jax.tree.leaves(shapes(_variables(runs["teacher"])),
                                     is_leaf=lambda x: isinstance(x, tuple))) - set(
      jax.tree.leaves(shapes(student), is_leaf=lambda x: isinstance(x, tuple)))
  assert (2, 32, 4) in teacher_only and not stored & teacher_only


def test_compressing_a_distilled_run_does_not_carry_its_teacher(runs, tmp_path):
  out = str(tmp_path / "int8")
  assert compress_tool.main(["--run", runs["out"], "--method", "quantize", "--bits", "8",
                             "--calib", "train", "--calib-batches", "1", "--out", out]) == 0
  assert run_config(out).train.distill.teacher == ""
  assert run_config(runs["out"]).train.distill.teacher  # the source keeps its own


def test_an_interrupted_distillation_resumes_with_experiments(runs, tmp_path, monkeypatch):
  """The tool's run stopped after step 3 (as by SIGTERM: a checkpoint there) records that it
  is unfinished; `python -m experiments --workdir` goes on from step 3 to the same steps as
  the uninterrupted run."""
  polls = []

  def agreed(self):  # the stop request the trainer polls after every step
    polls.append(1)
    return len(polls) == 3

  monkeypatch.setattr(StopRequest, "agreed", agreed)
  workdir = str(tmp_path / "run")
  assert compress_tool.main(["--run", runs["pruned"], "--method", "distill", "--teacher",
                             runs["teacher"], "--steps", str(STEPS), "--temperature", "2",
                             "--alpha", "0.9", "--out", workdir]) == 0
  monkeypatch.undo()
  entry = json.load(open(os.path.join(workdir, "compress.json")))["steps"][-1]
  assert entry["finished"] is False and entry["trained_steps"] == 3
  assert "val_bpb_after" not in entry and "val_bpb_before" in entry
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  p = subprocess.run([sys.executable, "-m", "experiments", "--workdir", workdir], cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  assert f"resumed from {workdir}/checkpoints/3" in p.stdout, p.stdout
  full = {r["step"]: r for r in _rows(runs["out"]) if "train/kd_loss" in r}
  resumed = {r["step"]: r for r in _rows(workdir) if "train/kd_loss" in r}
  assert sorted(resumed) == sorted(full) == list(range(1, STEPS + 1))
  for s in full:  # bit for bit on CPU
    for k in ("train/kd_loss", "train/loss"):
      assert resumed[s][k] == full[s][k], (s, k)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["final_val_loss"] == pytest.approx(
        json.load(open(os.path.join(runs["out"], "summary.json")))["final_val_loss"])


def test_fine_tuning_defaults(runs, tmp_path):
  teacher = str(tmp_path / "teacher")
  shutil.copytree(runs["teacher"], teacher)
  cfg = _teacher_config()
  cfg.train.keep_checkpoints = 4
  trainer.write_run(cfg, lm.init(jax.random.key(3), cfg), teacher, step=23)  # a newer one
  assert distill.checkpoint_steps(teacher) == [16, 18, 20, 23]
  args = argparse.Namespace(teacher=teacher, steps=25, temperature=1.0, alpha=1.0, lr=None,
                            warmup_steps=None)
  new = distill.distill_config(run_config(runs["pruned"]), args)
  assert new.train.lr == pytest.approx(0.1 * cfg.train.lr) and new.train.warmup_steps == 2
  assert new.train.steps == 25 and new.train.distill.step == 23
  args.lr, args.warmup_steps = 5e-4, 7
  new = distill.distill_config(run_config(runs["pruned"]), args)
  assert new.train.lr == 5e-4 and new.train.warmup_steps == 7


def _args(run, out, *extra, teacher=None):
  return ["--run", run, "--method", "distill", "--out", out, "--steps", "3",
          *(["--teacher", teacher] if teacher else []), *extra]


def test_bad_input_exits_2(runs, tmp_path, capsys):
  out = str(tmp_path / "new")
  wide = tiny_config()
  wide.model.vocab_size = 300
  other = tmp_path / "wide"
  os.makedirs(other / "checkpoints")
  trainer.write_config(wide, str(other))
  empty = tmp_path / "empty"
  os.makedirs(empty / "checkpoints")
  trainer.write_config(tiny_config(), str(empty))
  p, t = runs["pruned"], runs["teacher"]
  cases = [
      (_args(p, out), "--method distill needs --teacher"),
      (_args(p, out, teacher=str(tmp_path / "nowhere")),
       r"--teacher=.*nowhere' is invalid: must be a run directory"),
      (_args(p, out, teacher=str(other)),
       r"--teacher=.*wide' is invalid: that run has model.vocab_size=300, this one 258"),
      (_args(p, out, teacher=str(empty)), "that run has no finished checkpoint"),
      (_args(p, out, "--steps", "0", teacher=t), "--steps=0 is invalid: must be an integer >= 1"),
      (_args(p, out, "--temperature", "0", teacher=t),
       r"--temperature=0.0 is invalid: must be a finite number > 0"),
      (_args(p, out, "--alpha", "1.5", teacher=t), r"--alpha=1.5 is invalid: must be in \[0, 1\]"),
      (_args(p, out, "--alpha", "-0.5", teacher=t), r"--alpha=-0.5 is invalid"),
      (_args(p, out, "--lr", "-1", teacher=t), "--lr=-1.0 is invalid: must be a finite number"),
      (_args(p, out, "--warmup-steps", "4", teacher=t),
       r"--warmup-steps=4 is invalid: must be an integer in \[0, --steps=3\]"),
      (_args(p, out, "--criterion", "random", teacher=t),
       "--criterion is an option of --method prune"),
      (["--run", p, "--method", "prune", "--criterion", "random", "--remove", "0.5",
        "--teacher", t, "--out", out], "--teacher is an option of --method distill"),
  ]
  assert_exits_2(compress_tool.main, cases, capsys)
  assert not os.path.exists(out)
