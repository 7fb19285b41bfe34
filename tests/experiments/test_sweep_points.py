"""A sweep point counts as finished only for the config it ran; changed points are refused."""

import json

import pytest

from experiments.sweep.runner import finished_summary, prepare_point
from tests.conftest import tiny_config


def _finish(wd, cfg):
  prepare_point(str(wd), cfg)
  (wd / "summary.json").write_text(json.dumps({"steps": cfg.train.steps, "final_val_loss": 1.0}))


def test_finished_only_for_the_same_config(tmp_path):
  cfg = tiny_config()
  wd = tmp_path / "p"
  _finish(wd, cfg)
  assert finished_summary(str(wd), cfg)["final_val_loss"] == 1.0
  changed = tiny_config()
  changed.moe.topk.renormalize = not cfg.moe.topk.renormalize
  assert finished_summary(str(wd), changed) is None
  with pytest.raises(ValueError, match="different config.*moe.topk.renormalize"):
    prepare_point(str(wd), changed)
  longer = tiny_config()
  longer.train.steps = cfg.train.steps + 10  # continues from its checkpoint
  assert finished_summary(str(wd), longer) is None
  prepare_point(str(wd), longer)


def test_a_point_saved_before_a_key_existed_is_still_finished(tmp_path):
  cfg = tiny_config()
  wd = tmp_path / "p"
  _finish(wd, cfg)
  saved = json.loads((wd / "config.json").read_text())
  del saved["parallel"]
  (wd / "config.json").write_text(json.dumps(saved))
  assert finished_summary(str(wd), cfg) is not None
  prepare_point(str(wd), cfg)
