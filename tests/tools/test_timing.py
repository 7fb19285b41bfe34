"""tools/timing.py: call order and bookkeeping of the interleaved timer."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "timing.py"
_spec = importlib.util.spec_from_file_location("timing", _PATH)
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)


def _recorder(log: list, name: str):
  def fn(x):
    log.append((name, x))
    return x
  return fn


def test_calls_alternate_round_by_round_after_one_warmup_each():
  log: list = []
  fns = {"base": (_recorder(log, "base"), (1,)),
         "cand": (_recorder(log, "cand"), (2,))}
  out = timing.time_interleaved(fns, repeats=3)
  assert [n for n, _ in log] == ["base", "cand"] * 4  # warmup + 3 rounds
  assert all(x == {"base": 1, "cand": 2}[n] for n, x in log)
  assert set(out) == {"base", "cand"} and all(t >= 0 for t in out.values())


def test_slow_functions_stop_after_two_rounds():
  log: list = []
  fns = {"slow": (_recorder(log, "slow"), (0,)),
         "fast": (_recorder(log, "fast"), (0,))}
  timing.time_interleaved(fns, repeats=5, slow_s=-1.0)  # everything is "slow"
  assert [n for n, _ in log].count("slow") == 1 + 2


def test_warmup_rounds_are_interleaved_and_untimed():
  log: list = []
  fns = {"base": (_recorder(log, "base"), (1,)),
         "cand": (_recorder(log, "cand"), (2,))}
  timing.time_interleaved(fns, repeats=2, warmup=3)
  assert [n for n, _ in log] == ["base", "cand"] * 5  # 3 warmup + 2 timed rounds


def test_slow_functions_get_two_warmup_calls():
  log: list = []
  fns = {"slow": (_recorder(log, "slow"), (0,))}
  timing.time_interleaved(fns, repeats=1, warmup=5, slow_s=-1.0)
  assert [n for n, _ in log].count("slow") == 2 + 1


def test_rejects_no_repeats_or_warmup():
  with pytest.raises(ValueError, match="repeats=0"):
    timing.time_interleaved({}, repeats=0)
  with pytest.raises(ValueError, match="warmup=0"):
    timing.time_interleaved({}, repeats=1, warmup=0)
