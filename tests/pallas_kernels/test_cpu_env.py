"""Huge-page malloc setup of the entry points (pallas_kernels/cpu_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pallas_kernels import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_env_rules():
  base = {"PATH": "/bin"}
  env = cpu_env.hugepage_env(base)
  if env is None:
    pytest.skip("not glibc on Linux with transparent huge pages available")
  heap = ":".join(cpu_env.HEAP_TUNABLES)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.hugetlb=1:{heap}"}
  other = cpu_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:{heap}"
  own = cpu_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
  assert own["GLIBC_TUNABLES"] == ("glibc.malloc.trim_threshold=0:glibc.malloc.hugetlb=1:"
                                   "glibc.malloc.mmap_threshold=33554432")
  assert cpu_env.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's choice
  assert cpu_env.hugepage_env({"MOEJAX_HUGEPAGES": "0"}) is None


def test_reexecutes_once_with_same_pid_and_arguments(tmp_path):
  if cpu_env.hugepage_env(dict(os.environ)) is None:
    pytest.skip("nothing to do on this machine (or already set)")
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
      from pallas_kernels.cpu_env import exec_with_hugepage_malloc
      assert "jax" not in sys.modules  # the setup imports no JAX
      exec_with_hugepage_malloc()
      print("main", flush=True)
  """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = REPO
  out = subprocess.run([sys.executable, str(script), "a b", "--x=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  pid = out[0].split()[0]
  assert out == [f"{pid} None ['a b', '--x=1']",
                 f"{pid} glibc.malloc.hugetlb=1:{':'.join(cpu_env.HEAP_TUNABLES)} ['a b', '--x=1']",
                 "main"]
