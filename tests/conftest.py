"""Shared test fixtures: tiny configs that compile and run in seconds on CPU."""

from __future__ import annotations

import os
import tempfile

import ml_collections
import pytest

# One persistent XLA compilation cache for the test session and every process
# it starts (`python -m experiments`, sweeps, fake-device workers): the tiny
# models compile the same programs many times. Set before JAX starts; the
# cache key covers the program, JAX version and flags, so a hit is the same
# executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"moejax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from moejax.config import default_config  # noqa: E402

# For the subprocesses (and notebook kernels) of tests that check what moejax does,
# not how XLA optimises it: XLA's backend optimisation level 0 compiles the tiny
# models' programs in about half the time. It is the level of the backend's (LLVM)
# code generation: the programs, their sharding and collectives are the same, and
# results differ from the default level in the last bits (~1e-7 relative on a
# first step), far below the tolerances these tests compare at; runs compared bit
# for bit are all compiled at the same level.
QUICK_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def quick_compile(env: dict | None = None) -> dict:
  """`env` (default: os.environ) with QUICK_COMPILE_FLAG added to XLA_FLAGS."""
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {QUICK_COMPILE_FLAG}".strip()
  return env


# Fake host devices share the machine's cores: on 2 busy cores one device thread can
# reach a collective minutes after the others, and XLA's CPU runtime aborts a
# collective that waits longer than its terminate timeout (a crash, not a failed
# check). The fake-device subprocesses wait as long as their own test timeout.
FAKE_DEVICE_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                                "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")


def fake_devices(n: int, env: dict | None = None) -> dict:
  """`env` (default: os.environ) whose XLA_FLAGS give JAX `n` CPU devices that may wait."""
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
                      f" {FAKE_DEVICE_COLLECTIVE_FLAGS}").strip()
  return env


def tiny_config(**moe_overrides) -> ml_collections.ConfigDict:
  """A 2-layer, d=32 MoE LM (E=4, k=2) on 16-token sequences."""
  c = default_config()
  c.name = "tiny"
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.ffn_hidden = 64
  c.moe.num_experts = 4
  c.moe.top_k = 2
  c.moe.expert_hidden = 32
  for k, v in moe_overrides.items():
    c.moe[k] = v
  c.train.steps = 30
  c.train.batch_size = 8
  c.train.seq_len = 16
  c.train.warmup_steps = 5
  c.train.lr = 1e-2
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  return c


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m experiments` overrides for a tiny quickstart-shaped run.
TINY_FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=2",
              "--config.model.num_heads=2", "--config.moe.num_experts=4",
              "--config.moe.expert_hidden=32", "--config.train.batch_size=4",
              "--config.train.seq_len=16", "--config.train.warmup_steps=2",
              "--config.train.eval_batches=1"]


@pytest.fixture
def tiny() -> ml_collections.ConfigDict:
  return tiny_config()


def load_tool(name: str):
  """Import tools/<name>.py as a module (tools/ is scripts, not a package)."""
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location(f"tools_{name}",
                                                os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_exits_2(main, cases: list[tuple[list[str], str]], capsys) -> None:
  """Each (argv, pattern): main(argv) returns 2 and prints `error: ...` matching the regex."""
  import re  # noqa: PLC0415

  for argv, message in cases:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), (argv, err)
