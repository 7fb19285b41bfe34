"""Multi-host settings from flags and environment (no processes are started)."""

from __future__ import annotations

import pytest

from moejax.parallel import distributed


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for names in distributed.ENV.values():
    for n in names:
      monkeypatch.delenv(n, raising=False)


def test_single_process_is_a_no_op():
  assert distributed.resolve() is None
  assert distributed.resolve(num_processes=1) is None
  assert distributed.initialize() is False


def test_flags_and_environment(monkeypatch):
  want = {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
  assert distributed.resolve("h:1234", 2, 1) == want
  monkeypatch.setenv("MOEJAX_COORDINATOR", "h:1234")
  monkeypatch.setenv("MOEJAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")  # JAX's own name works too
  assert distributed.resolve() == want
  assert distributed.resolve(process_id=0)["process_id"] == 0  # a flag beats the env
  assert distributed.resolve("auto") == {"num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("args,message", [
    (("h:1", 2, None), "missing: ['--process_id']"),
    ((None, 2, 0), "missing: ['--coordinator']"),
    (("h:1", 2, 2), "--process_id=2 is invalid"),
    (("h:1", 0, 0), "--num_processes=0 is invalid"),
])
def test_bad_settings_name_the_flag(args, message):
  with pytest.raises(ValueError) as e:
    distributed.resolve(*args)
  assert message in str(e.value)


def test_non_integer_environment_names_the_flag(monkeypatch):
  monkeypatch.setenv("MOEJAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match=r"--num_processes='two'"):
    distributed.resolve("h:1")
